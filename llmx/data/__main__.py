"""`python -m llmx.data prepare --config X [section.key=value ...]`: build the tokenizer and the datasets
ahead of training (training does the same lazily when nothing is prepared), then summarise them."""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
from tqdm.auto import tqdm

from llmx import config as config_lib
from llmx.cli import run as run_cli
from llmx.data import sources as sources_lib
from llmx.data.prepare import prepare_data


def count_tokens(source, tokenizer, text_field: str, *, desc: str) -> tuple[int, int]:
    """(tokens including BOS/EOS, UTF-8 bytes) of every document of a source (supervised records come
    tokenized: their bytes are those of the decoded text, special tokens not counted)."""
    tokens = n_bytes = 0
    for i in tqdm(range(len(source)), desc=desc, unit="doc", leave=False):
        record = source[i]
        ids = record["tokens"] if "tokens" in record else None
        text = tokenizer.decode(ids) if ids is not None else sources_lib.document_text(record, text_field)
        tokens += len(ids) if ids is not None else len(tokenizer.encode(text))
        n_bytes += len(text.encode("utf-8"))
    return tokens, n_bytes


def summary(cfg) -> dict:
    data = prepare_data(cfg)
    report = {"tokenizer": cfg.data.tokenizer, "vocab_size": int(data.tokenizer.vocab_size), "sets": {}}
    named = {"train": [s for s, _ in data.train], **{k: [v] for k, v in data.eval_sets.items()}}
    for name, parts in named.items():
        docs = sum(len(p) for p in parts)
        counted = [count_tokens(p, data.tokenizer, data.text_field, desc=name) for p in parts]
        tokens, n_bytes = (int(x) for x in np.sum(counted, axis=0))
        report["sets"][name] = {"documents": docs, "tokens": tokens, "bytes": n_bytes}
    for name, _ in sources_lib.parse_mixture(cfg.data.source):
        if not name.startswith("tfds:") and cfg.data.format == "text":
            cleaning = sources_lib.Cleaning(validation_percent=cfg.data.validation_percent, min_chars=cfg.data.min_chars,
                                            dedup=cfg.data.dedup, text_field=cfg.data.text_field)
            stats = sources_lib.corpus_stats(name, cache_dir=cfg.data.cache_dir, cleaning=cleaning,
                                             max_documents=cfg.data.max_documents)
            report.setdefault("cleaning", {})[name] = {
                k: stats.get(k) for k in ("files", "dropped", "duplicates")
            }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmx.data", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    report = summary(config_lib.load(args.config, args.overrides))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"tokenizer {report['tokenizer']} ({report['vocab_size']} ids)")
    print(f"{'set':<14}{'documents':>11}{'tokens':>14}{'bytes':>14}{'bytes/token':>13}")
    for name, s in report["sets"].items():
        print(f"{name:<14}{s['documents']:>11}{s['tokens']:>14}{s['bytes']:>14}{s['bytes'] / max(s['tokens'], 1):>13.2f}")
    for name, c in report.get("cleaning", {}).items():
        print(f"{name}: {c['files']} files; dropped {c['dropped']} empty, binary or short; {c['duplicates']} duplicates")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
