"""Task evaluation through lm-evaluation-harness: the `llmx` adapter's log-likelihoods against by-hand
sums of llmx's token log-probabilities, its rolling log-likelihood against llmx.evaluate's eval step,
and the project's shipped tasks (multiple choice, generation, per-domain perplexity) end to end."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer

from llmx import evaluate as ev
from llmx import harness
from llmx.cli import run as run_cli
from llmx.data.tokenizer import HFTokenizer, train_bpe
from llmx.run import restore_run
from llmx.train import train
from tests.helpers import REPO, read_metrics, small_config


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    """Two steps of SFT on the shipped reversal task (8 devices) with a harness task after every step,
    restored for the adapter."""
    cfg = small_config(tmp_path_factory.mktemp("harness"), data_dir, "data.format=prompt_completion",
                       f"data.source={REPO / 'configs/tasks/reverse/train.jsonl'}", "train.steps=2",
                       "checkpoint.every=2", "model.init_std=0.2", "train.eval_tasks=llmx_add",
                       "train.eval_tasks_limit=3", "train.eval_tasks_every=1")
    train(cfg)
    return restore_run(run_dir=cfg.train.run_dir)


def request(*args):
    return SimpleNamespace(args=args)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens):
    return nnx.merge(graphdef, params)(tokens)  # (1, T, V)


def logits_of(run, ids: list[int], T: int = 32) -> np.ndarray:
    """The logits (len(ids), V) of one unbatched, right-padded causal pass (padding comes after, so it
    changes nothing before it); one compiled shape for every call."""
    tokens = np.zeros((1, T), np.int32)
    tokens[0, :len(ids)] = ids
    return np.asarray(_forward(run.steps.graphdef, run.params, jnp.asarray(tokens)), np.float64)[0, :len(ids)]


def logprobs(run, ids: list[int]) -> np.ndarray:
    """log p(ids[i] | ids[:i]) for i >= 1."""
    logits = logits_of(run, ids[:-1])
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return logp[np.arange(len(ids) - 1), ids[1:]]


@pytest.mark.slow
def test_loglikelihood_equals_by_hand_sums_across_a_tokenizer_boundary(run, tmp_path):
    path = train_bpe(["say hello there, hello world; well hello " * 20, "the cat sat on the mat " * 20],
                     vocab_size=300, path=tmp_path / "tokenizer.json")
    tok = HFTokenizer(Tokenizer.from_file(str(path)), bos_token="<s>", eos_token="</s>", pad_token="<pad>", path=path)
    lm = harness.LlmxLM(params=run.params, graphdef=run.steps.graphdef, tokenizer=tok, data_cfg=run.cfg.data,
                        seq_len=run.cfg.model.seq_len, mesh=run.steps.mesh, batch_size=16)
    items = [("the cat sat", " on the mat"), ("say he", "llo there, hello"), ("well", " hello world")]
    encode = lambda text: [tok.bos_id, *tok.encode(text, add_bos=False, add_eos=False).tolist()]  # noqa: E731
    # "say he" + "llo ...": the continuation's first characters merge with the context's last token.
    assert encode("say hello there")[:len(encode("say he"))] != encode("say he")
    results = lm.loglikelihood([request(c, x) for c, x in items])
    for (context, continuation), (logp, greedy) in zip(items, results):
        whole, n_context = encode(context + continuation), len(encode(context))  # HFLM's rule
        expected = logprobs(run, whole)[n_context - 1:]  # the tokens the whole encoding adds
        assert len(expected) >= 1 and logp == pytest.approx(expected.sum(), abs=1e-4)
        assert isinstance(greedy, bool)


def test_loglikelihood_rolling_equals_the_eval_step_sum(run):
    lm = harness.LlmxLM.from_run(run, batch_size=16)
    T = run.cfg.model.seq_len
    short, long = "def f(x): return x", "import os\n" + "print(os.getcwd())\n" * 5  # 1 and 4 windows of 32
    got_short, got_long = lm.loglikelihood_rolling([request(short), request(long)])
    # llmx.evaluate's eval step (sum of target nats, count) on BOS + the text.
    ids = [1, *lm._encode(short, bos=False)]
    batch = {"inputs": np.zeros((8, T), np.int32), "targets": np.zeros((8, T), np.int32),
             "segment_ids": np.zeros((8, T), np.int32), "positions": np.zeros((8, T), np.int32),
             "loss_mask": np.zeros((8, T), bool)}
    n = len(ids) - 1
    batch["inputs"][0, :n], batch["targets"][0, :n] = ids[:-1], ids[1:]
    batch["segment_ids"][0, :n], batch["positions"][0, :n], batch["loss_mask"][0, :n] = 1, np.arange(n), True
    nats, count = run.steps.evaluate(run.params, jax.device_put(batch, run.steps.eval_batch_shardings))
    assert int(count) == n and got_short == pytest.approx(-float(nats), abs=1e-4)
    # Several windows: lm_eval's disjoint windows, each scored by hand.
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
        token_list=lm._encode(long, bos=False), prefix_token=1, max_seq_len=T, context_len=1)]
    assert len(windows) == 4
    expected = sum(logprobs(run, [*ctx, *pred])[-len(pred):].sum() for ctx, pred in windows)
    assert got_long == pytest.approx(expected, abs=1e-3)


def test_generate_until_matches_llmx_greedy_decoding_and_stops(run):
    lm = harness.LlmxLM.from_run(run, batch_size=16)
    prompts = ["reverse abc =", "reverse hello ="]
    out = lm.generate_until([request(p, {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}) for p in prompts])
    for prompt, text in zip(prompts, out):
        ids = lm._encode(prompt, bos=True)
        for _ in range(5):  # greedy, one full forward per token
            nxt = int(np.argmax(logits_of(run, ids)[-1]))
            if nxt == lm.tokenizer.eos_id:
                break
            ids.append(nxt)
        expected = lm.tokenizer.decode(ids[len(lm._encode(prompt, bos=True)):]).split("\n")[0]
        assert text == expected


def test_eval_tasks_during_training_land_in_metrics_jsonl(run):
    tasks = {m["step"]: m["tasks/llmx_add/exact_match"] for m in read_metrics(run.cfg.train.run_dir)
             if "tasks/llmx_add/exact_match" in m}
    assert sorted(tasks) == [0, 1, 2] and all(0.0 <= v <= 1.0 for v in tasks.values())


def test_unknown_task_is_a_one_line_error_before_any_checkpoint_is_read(tmp_path, capsys):
    argv = ["--run-dir", str(tmp_path / "nowhere"), "--tasks", "llmx_reverse,llmx_revrse"]
    assert run_cli(lambda: ev.main(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown task 'llmx_revrse'; did you mean llmx_reverse") and err.count("\n") == 1, err


def test_shipped_tasks_run_through_the_harness_end_to_end(run, capsys):
    argv = ["--run-dir", run.cfg.train.run_dir, "--tasks", "llmx_keyword,llmx_reverse,llmx_perplexity",
            "--limit", "3", "--json"]
    assert run_cli(lambda: ev.main(argv)) == 0
    table = json.loads(capsys.readouterr().out)["tasks"]
    assert set(table) == {"llmx_keyword", "llmx_reverse", "llmx_ppl_code", "llmx_ppl_docs"}
    assert {"acc", "acc_norm"} <= set(table["llmx_keyword"]) and 0 <= table["llmx_keyword"]["acc"] <= 1
    assert 0 <= table["llmx_reverse"]["exact_match"] <= 1
    for domain in ("llmx_ppl_code", "llmx_ppl_docs"):
        assert table[domain]["bits_per_byte"] > 0 and table[domain]["word_perplexity"] > 1
    # Relative data files resolve beside the task YAML from any directory.
    assert harness._absolute_data_files({"dataset_kwargs": {"data_files": {"test": "add/test.jsonl"}}},
                                        harness.TASKS_DIR)["dataset_kwargs"]["data_files"]["test"] == str(
        Path(harness.TASKS_DIR) / "add/test.jsonl")
