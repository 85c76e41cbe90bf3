"""Checks a Hugging Face export (`python -m llmx.hf export [--merge-lora]`) against the run it came from:
the largest logit difference between transformers and llmx on a task's held-out records, and the exact
match of transformers' own greedy decoding on them. Prints one JSON object.

    python scripts/check_hf_export.py --run-dir runs/sft_tiny_lora --hf-dir hf/sft \\
        --records configs/tasks/upper/test.jsonl

The records are prompt/completion lines (`data.prompt_field`, `data.completion_field` of the run);
a record's tokens are the run's own (BOS + prompt + completion + EOS, as in training), and a
generation counts when its decoded text before EOS equals the completion exactly.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx

from llmx.cli import run as run_cli
from llmx.data.supervised import Formatter, Record
from llmx.errors import ConfigError
from llmx.models import lora
from llmx.run import restore_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/check_hf_export.py", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="the llmx run that was exported")
    parser.add_argument("--hf-dir", required=True, help="the directory `llmx.hf export` wrote")
    parser.add_argument("--records", required=True, help="a .jsonl of prompt/completion records")
    parser.add_argument("--limit", type=int, default=0, help="only the first N records (0: all)")
    args = parser.parse_args(argv)
    if not (Path(args.hf_dir) / "config.json").is_file():
        raise ConfigError(f"--hf-dir {args.hf_dir} holds no config.json: run `python -m llmx.hf export` first")

    run = restore_run(run_dir=args.run_dir, single_device=True)
    data = run.cfg.data
    formatter = Formatter(data, run.tokenizer)
    lines = [line for line in Path(args.records).read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines][: args.limit or None]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir).float().eval()
    ours = nnx.merge(run.steps.graphdef, run.params)

    # Records of one length go as one batch (one compile of the llmx forward per length).
    forward = jax.jit(lambda params, tokens: nnx.merge(run.steps.graphdef, params)(tokens))
    encoded = [formatter.encode(Record(f"{args.records}:{i + 1}", r, lines[i]))["tokens"] for i, r in enumerate(records)]
    prompts = [formatter.prompt_ids(r[data.prompt_field]) for r in records]
    worst, hits = 0.0, 0
    for length in sorted({len(t) for t in encoded}):
        group = [i for i, t in enumerate(encoded) if len(t) == length]
        tokens = np.stack([encoded[i] for i in group])  # (B, N)
        with torch.no_grad():
            expected = theirs(torch.as_tensor(tokens)).logits.numpy()  # (B, N, V)
        got = np.asarray(forward(run.params, jnp.asarray(tokens)))  # (B, N, V)
        worst = max(worst, float(np.abs(got - expected).max()))
    for length in sorted({len(p) for p in prompts}):
        group = [i for i, p in enumerate(prompts) if len(p) == length]
        with torch.no_grad():
            out = theirs.generate(torch.as_tensor([prompts[i] for i in group]), do_sample=False,
                                  max_new_tokens=max(len(encoded[i]) for i in group),
                                  eos_token_id=run.tokenizer.eos_id, pad_token_id=run.tokenizer.pad_id)
        for row, i in zip(out[:, length:].tolist(), group):
            new = row[: row.index(run.tokenizer.eos_id)] if run.tokenizer.eos_id in row else row
            hits += run.tokenizer.decode(new) == records[i][data.completion_field]

    trainable, total = lora.trainable_count(run.params)
    print(json.dumps({
        "records": len(records), "max_abs_logit_diff": worst,
        "transformers_greedy_exact_match": hits / len(records),
        "llmx_trainable_parameters": trainable, "llmx_parameters": total,
        "trainable_fraction": trainable / total,
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
