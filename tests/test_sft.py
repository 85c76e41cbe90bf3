"""Supervised fine-tuning: loss weights of prompt/completion and chat records (through packing), LoRA
(frozen base, ZeRO-3 on 8 devices like 1 device, adapters-only checkpoints, merged export that
transformers loads), k-fold splits and the cross-validation summary, and one-line errors for bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from llmx import config as config_lib
from llmx import data as data_lib
from llmx import hf
from llmx import models
from llmx.cli import run as run_cli
from llmx.crossval import fold_configs, summarize
from llmx.data import supervised
from llmx.models import lora
from llmx.run import restore_run
from llmx.step import loss_sums
from llmx.train import main as train_main
from llmx.train import train
from tests.helpers import REPO, SMALL, small_config

PROMPTS = [("reverse abc =", " cba"), ("2+2=", "4"), ("say hello:", " hello world"), ("x", " y"),
           ("reverse lmnop =", " ponml"), ("9+10=", "19"), ("name a colour:", " red"), ("q:", " a")]
CHATS = [
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "reverse ab"}, {"role": "assistant", "content": "ba"}],
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sft_data")
    write_jsonl(d / "pc.jsonl", [{"prompt": p, "completion": c} for p, c in PROMPTS])
    write_jsonl(d / "chat.jsonl", [{"messages": m} for m in CHATS])
    return d


def byte_ids(text: str) -> list[int]:
    return [b + 3 for b in text.encode()]


def test_prompt_completion_weights_are_zero_on_prompts_and_one_on_completions_through_packing(files, tmp_path, data_dir):
    cfg = small_config(tmp_path, data_dir, "data.format=prompt_completion", f"data.source={files / 'pc.jsonl'}",
                       "data.validation_percent=0")
    data = data_lib.prepare_data(cfg)
    records = data.train[0][0]
    # Each record by hand: BOS + prompt bytes (weight 0), completion bytes + EOS (weight 1).
    expected = {}
    for p, c in PROMPTS:
        tokens = [1, *byte_ids(p), *byte_ids(c), 2]
        expected[tuple(tokens)] = [0] * (1 + len(p.encode())) + [1] * (len(c.encode()) + 1)
    assert sorted(tuple(r["tokens"].tolist()) for r in records) == sorted(expected)
    for r in records:
        assert r["weights"].tolist() == expected[tuple(r["tokens"].tolist())]

    it = iter(data_lib.batches(data.train, data.tokenizer, seq_len=32, global_rows=4, seed=0, prefetch=0, supervised=True))
    batch = {k: np.asarray(v) for k, v in next(it).items()}  # (4, 32) each
    it.close()
    seen = 0
    for row in range(4):
        seg = batch["segment_ids"][row]
        assert len(set(seg[seg > 0].tolist())) >= 2  # several records share a row: packing boundaries inside
        for s in set(seg[seg > 0].tolist()):
            where = np.flatnonzero(seg == s)  # input positions of this record piece
            tokens = batch["inputs"][row][where].tolist()
            if tuple(tokens) in expected:  # the whole record is input; its last target is the next record's
                weights = expected[tuple(tokens)] + [0]
            else:  # the record ends the row: its last token is only a target
                weights = expected[(*tokens, int(batch["targets"][row][where[-1]]))]  # packed whole, never split
            # The target at input position i is token i+1: its weight is the record's weight there.
            assert batch["loss_mask"][row][where].astype(int).tolist() == weights[1:]
            seen += 1
    assert seen >= len(PROMPTS)

    # The packed loss equals the hand-computed masked loss of every record run on its own row.
    model = models.get("llama").build(cfg.model, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    total, count = jax.jit(loss_sums, static_argnums=1)(params, graphdef, {k: jnp.asarray(v) for k, v in batch.items()})
    pieces = [(row, np.flatnonzero(batch["segment_ids"][row] == s)) for row in range(4)
              for s in sorted(set(batch["segment_ids"][row].tolist()) - {0})]
    alone = np.zeros((len(pieces), 32), np.int32)  # (N, T): one record piece per row, then padding
    for i, (row, where) in enumerate(pieces):
        alone[i, :len(where)] = batch["inputs"][row][where]
    seg = (np.arange(32)[None] < np.asarray([len(w) for _, w in pieces])[:, None]).astype(np.int32)
    forward = jax.jit(lambda p, x, s, pos: nnx.merge(graphdef, p)(x, s, pos))
    logits = forward(params, jnp.asarray(alone), jnp.asarray(seg), jnp.asarray(np.broadcast_to(np.arange(32), alone.shape)))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)  # (N, T, V)
    by_hand, n = 0.0, 0
    for i, (row, where) in enumerate(pieces):
        targets, mask = batch["targets"][row][where], batch["loss_mask"][row][where]
        by_hand -= logp[i, np.arange(len(where)), targets][mask].sum()
        n += int(mask.sum())
    assert int(count) == n
    assert float(total) == pytest.approx(by_hand, rel=1e-5)


def test_chat_weights_cover_assistant_turns_and_their_eos_only(files, tmp_path, data_dir):
    cfg = small_config(tmp_path, data_dir, "data.format=chat", f"data.source={files / 'chat.jsonl'}",
                       "data.validation_percent=0")
    formatter = supervised.Formatter(cfg.data, data_lib.build_tokenizer(cfg.data, vocab_size=384))
    for messages in CHATS:
        record = supervised.Record("chat.jsonl:1", {"messages": messages}, "")
        out = formatter.encode(record)
        tokens, weights = out["tokens"].tolist(), out["weights"].tolist()
        # llmx's default template, rendered by hand.
        text = "".join(f"<|assistant|>\n{m['content']}</s>\n" if m["role"] == "assistant"
                       else f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        assert tokens == formatter.encode_text("<s>" + text)
        trained = [t for t, w in zip(tokens, weights) if w]
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        assert trained == [i for a in answers for i in [*byte_ids(a), 2]]  # each answer and its EOS
        # The weighted tokens are contiguous spans, one per assistant turn.
        spans = np.flatnonzero(np.diff([0, *weights, 0]) != 0).reshape(-1, 2)
        assert len(spans) == len(answers)
    full = supervised.Formatter(dataclasses.replace(cfg.data, train_on_prompt=True), formatter.tokenizer)
    assert set(full.encode(supervised.Record("k", {"messages": CHATS[0]}, ""))["weights"].tolist()) == {1}


# ------------------------------------------------------------------------------------------- LoRA

LORA = ["data.format=prompt_completion", f"data.source={REPO / 'configs/tasks/add/train.jsonl'}",
        "data.validation_percent=2", "model.lora_rank=4", "model.lora_alpha=8", "model.lora_targets=wq,wv,w_down",
        "optim.lr=1e-2", "train.steps=10", "checkpoint.every=10"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, data_dir) -> Path:
    """A few steps of full fine-tuning: the base the LoRA runs start from."""
    cfg = small_config(tmp_path_factory.mktemp("base"), data_dir, *LORA[:3], "train.steps=3", "checkpoint.every=3")
    train(cfg, devices=jax.devices()[:1])
    return Path(cfg.train.run_dir)


def lora_config(tmp_path_factory, data_dir, base_run, name, *overrides):
    """The LoRA fine-tune of base_run with adapters-only checkpoints."""
    common = [*LORA, f"checkpoint.restore_from={base_run}", "checkpoint.restore_mode=weights",
              "checkpoint.adapters_only=true"]
    return small_config(tmp_path_factory.mktemp(name), data_dir, *common, *overrides)


@pytest.fixture(scope="module")
def lora_one(tmp_path_factory, data_dir, base_run):
    """The LoRA fine-tune on 1 device: (config, result)."""
    cfg = lora_config(tmp_path_factory, data_dir, base_run, "lora1", "train.micro_batch_size=8")
    return cfg, train(cfg, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def lora_eight(tmp_path_factory, data_dir, base_run):
    """The same fine-tune under ZeRO-3 on 8 devices (only the slow test needs it)."""
    cfg = lora_config(tmp_path_factory, data_dir, base_run, "lora8", "train.micro_batch_size=1", "mesh.data=1",
                      "mesh.fsdp=8", "mesh.zero_stage=3")
    return cfg, train(cfg)


@pytest.mark.slow
def test_lora_trains_adapters_only_and_zero3_on_8_devices_matches_one_device(lora_one, lora_eight, base_run):
    (one_cfg, one), (_, eight) = lora_one, lora_eight
    steps = sorted(one.losses)
    assert len(steps) == 10 and one.losses[steps[-1]] < one.losses[steps[0]]
    np.testing.assert_allclose([eight.losses[s] for s in steps], [one.losses[s] for s in steps], rtol=1e-5)

    base = nnx.to_flat_state(restore_run(run_dir=str(base_run), single_device=True).params)
    after = nnx.to_flat_state(jax.device_get(one.params))
    base = {path: np.asarray(v[...]) for path, v in base}
    changed = {path for path, v in after if not lora.is_adapter(path) and not np.array_equal(np.asarray(v[...]), base[path])}
    assert not changed  # the base is frozen
    adapters = [path for path, _ in after if lora.is_adapter(path)]
    assert {str(p[-2]) for p in adapters} == {"wq_lora", "wv_lora", "w_down_lora"}

    # The checkpoint holds the adapters (and their optimizer state), not the base.
    size = lambda run: sum(f.stat().st_size for f in (Path(run) / "checkpoints").rglob("*") if f.is_file())  # noqa: E731
    assert size(one_cfg.train.run_dir) < size(base_run) / 2
    restored = restore_run(run_dir=one_cfg.train.run_dir, single_device=True)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), jax.device_get(one.params))


def test_lora_rank_8_trains_under_5_percent_of_the_tiny_model():
    cfg = config_lib.load(REPO / "configs/tiny.yaml", ["model.lora_rank=8"])
    abstract = nnx.eval_shape(lambda: models.get("llama").build(cfg.model, rngs=nnx.Rngs(0)))
    trainable, total = lora.trainable_count(nnx.state(abstract, nnx.Param))
    assert trainable / total <= 0.05 and trainable == 4 * 4 * 8 * (256 + 256)  # 4 layers x wq,wk,wv,wo x r(in+out)


@pytest.mark.slow  # trains the base and the LoRA run first (~16 s on 2 cores)
def test_merged_lora_export_loads_in_transformers_with_llmx_logits(lora_one, tmp_path, capsys):
    cfg, _ = lora_one
    assert run_cli(lambda: hf.main(["export", "--run-dir", cfg.train.run_dir, "--out", str(tmp_path / "x")])) == 2
    assert "--merge-lora" in capsys.readouterr().err
    out = hf.export_run(cfg.train.run_dir, tmp_path / "hf", merge_lora=True)
    theirs = transformers.LlamaForCausalLM.from_pretrained(out).float().eval()
    run = restore_run(run_dir=cfg.train.run_dir, single_device=True)
    tokens = np.random.default_rng(0).integers(3, 259, (2, 20))
    ours = np.asarray(nnx.merge(run.steps.graphdef, run.params)(jnp.asarray(tokens)))
    with torch.no_grad():
        expected = theirs(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------- folds

def test_folds_partition_the_records_and_the_summary_gives_mean_and_std(tmp_path, data_dir):
    records = supervised.read_records(str(REPO / "configs/tasks/reverse/test.jsonl"), fields={"prompt": str})
    held = [{r.key for r in supervised.split_records(records, validation_percent=0, folds=4, fold=i)["validation"]}
            for i in range(4)]
    assert sum(map(len, held)) == len(records) == len(set().union(*held))  # disjoint, covering
    assert all(30 <= len(h) <= 70 for h in held)
    cfg = small_config(tmp_path, data_dir, "data.format=prompt_completion", "data.source=x.jsonl")
    cfgs = fold_configs(cfg, 3)
    assert [(c.data.folds, c.data.fold, Path(c.train.run_dir).name) for c in cfgs] == [(3, i, f"fold_{i}") for i in range(3)]
    s = summarize([{"eval_loss": 1.0, "tasks/t/acc": 0.5}, {"eval_loss": 2.0, "tasks/t/acc": 0.7}, {"eval_loss": 3.0}])
    assert s["eval_loss"] == {"mean": 2.0, "std": 1.0, "n": 3}
    assert s["tasks/t/acc"]["mean"] == pytest.approx(0.6) and s["tasks/t/acc"]["std"] == pytest.approx(0.1414213, rel=1e-5)


def test_shipped_generation_tasks_hold_out_items_never_trained_on():
    """configs/sft_tiny.yaml fine-tunes on a task's train split and scores its test split: disjoint prompts."""
    import yaml

    sft = config_lib.load(REPO / "configs/sft_tiny.yaml", [])
    checked = set()
    for spec_file in sorted((REPO / "configs/tasks").glob("llmx_*.yaml")):
        spec = yaml.safe_load(spec_file.read_text())
        if spec.get("output_type") != "generate_until":
            continue
        files = {split: spec_file.parent / f for split, f in spec["dataset_kwargs"]["data_files"].items()}
        prompts = {split: [json.loads(line)["prompt"] for line in path.read_text().splitlines()] for split, path in files.items()}
        assert len(prompts["test"]) == 200 and len(prompts["train"]) > 10 * len(prompts["test"])
        assert not set(prompts["test"]) & set(prompts["train"]), spec["task"]
        checked.add(spec["task"])
        if spec["task"] == sft.train.eval_tasks:
            assert (REPO / sft.data.source).resolve() == files["train"].resolve()
    assert {"llmx_upper", "llmx_reverse", "llmx_add", sft.train.eval_tasks} <= checked


# ------------------------------------------------------------------------------------------- errors

@pytest.mark.slow
def test_bad_input_is_a_one_line_error_naming_file_and_line(files, tmp_path, capsys):
    no_field = write_jsonl(tmp_path / "nofield.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}])
    no_assistant = write_jsonl(tmp_path / "noasst.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    base = [*SMALL, f"train.run_dir={tmp_path / 'run'}", "train.steps=1"]
    cases = [
        (train_main, [*base, "data.format=prompt_completion", f"data.source={no_field}"],
         f"{no_field}:2: the record has no field 'completion'"),
        (train_main, [*base, "data.format=chat", f"data.source={no_assistant}"],
         f"{no_assistant}:1: the conversation has no assistant turn"),
        (train_main, [*base, "data.format=chat", f"data.source={files / 'chat.jsonl'}", f"data.chat_template={template}"],
         f"data.chat_template file {template} has no {{% generation %}} marker"),
        (train_main, [*base, "model.lora_rank=4", "model.lora_targets=wq,w_qkv"], "'w_qkv' is not a projection"),
    ]
    for main, argv, message in cases:
        assert run_cli(lambda: main(argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
