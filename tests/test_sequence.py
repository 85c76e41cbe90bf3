"""Sequence parallelism (`mesh.sequence`, llmx.sequence, llmx.attention ring / gather / ulysses) on the
8-device CPU mesh: every strategy, with and without causal load balancing, trains on packed documents
like one device; the attention alone matches a one-device reference with documents that cross chunk
boundaries; the compiled step carries each strategy's collectives; the balanced order gives every
device the same live score blocks; evaluation and generation work on the mesh; bad input is one line."""

import functools
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from conftest import REPO
from helpers import SMALL, needs_extra, small_config
from llmx import attention as attention_lib
from llmx import axes
from llmx import config as config_lib
from llmx import generate as gen
from llmx import mesh as mesh_lib
from llmx import plan as plan_lib
from llmx import sequence as sequence_lib
from llmx import targets
from llmx.attention import SequenceParallel, blockwise
from llmx.errors import ConfigError
from llmx.cli import run as run_cli
from llmx.plan import collective_counts, compile_train_step, longest_seq_len
from llmx.plan import main as plan_main
from llmx.run import restore_run
from llmx.sequence import token_order
from llmx.step import build_steps
from llmx.train import train
from test_attention import reference_attention, run_worker

T = 64  # tokens per sequence: 8 chunks of 8 on sequence=4 with load balancing
GLOBAL_BATCH = 16
STRATEGIES = ("all_gather", "ulysses", "ring")
SEQ4 = ["mesh.data=1", "mesh.fsdp=2", "mesh.sequence=4", "mesh.zero_stage=3"]
LAYOUTS = {
    **{f"sequence=4 fsdp=2 {s} {'balanced' if b else 'in order'}": [
        *SEQ4, f"mesh.sequence_strategy={s}", f"mesh.sequence_load_balance={str(b).lower()}"]
       for s in STRATEGIES for b in (True, False)},
    # 4 heads over tensor x sequence; the 2 KV heads are repeated to 4 so each device keeps one group.
    "sequence=2 tensor=2 fsdp=2 ulysses": ["mesh.data=1", "mesh.fsdp=2", "mesh.sequence=2", "mesh.tensor=2",
                                            "mesh.zero_stage=3", "mesh.sequence_strategy=ulysses"],
}


@pytest.fixture(scope="module")
def short_documents(tmp_path_factory):
    """A corpus of 400 documents of 10-90 bytes: every 64-token row packs several, and they cross the
    8-token chunks of the load-balanced layout."""
    root = tmp_path_factory.mktemp("short_docs")
    rng = np.random.default_rng(0)
    words = "def return import class self lambda yield while for in if else print value list dict".split()
    for i in range(400):
        text, target = [], rng.integers(10, 90)
        while len(" ".join(text)) < target:
            text.append(words[rng.integers(len(words))])
        (root / f"doc{i:03d}.txt").write_text(" ".join(text))
    return root


def _config(tmp_path, data_dir, corpus, *overrides):
    return small_config(tmp_path, data_dir, f"data.source={corpus}", "data.max_documents=0", f"model.seq_len={T}",
                        "train.steps=20", "checkpoint.every=0", *overrides)


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory, data_dir, short_documents):
    cfg = _config(tmp_path_factory.mktemp("one"), data_dir, short_documents, f"train.micro_batch_size={GLOBAL_BATCH}")
    summary = train(cfg, devices=jax.devices()[:1])
    return summary, jax.device_get(summary.params)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.slow
def test_layout_trains_like_one_device(layout, single_device_run, tmp_path, data_dir, short_documents):
    """Per step loss within 1e-5 of one device, the final evaluation too (it runs on the mesh, in the
    step's token order), the same weights after 20 steps, and a checkpoint that reopens on one device."""
    overrides = LAYOUTS[layout]
    shape = mesh_lib.mesh_shape(config_lib.load(None, overrides).mesh, 8)
    micro = GLOBAL_BATCH // axes.data_parallel_size(shape)
    summary = train(_config(tmp_path, data_dir, short_documents, f"train.micro_batch_size={micro}", *overrides))
    reference, ref_params = single_device_run
    steps = sorted(reference.losses)
    assert sorted(summary.losses) == steps == list(range(1, 21))
    np.testing.assert_allclose([summary.losses[s] for s in steps], [reference.losses[s] for s in steps], rtol=1e-5)
    assert summary.final_eval_loss == pytest.approx(reference.final_eval_loss, rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6),
                 jax.device_get(summary.params), ref_params)
    # The checkpoint holds the weights, not the layout: it reopens on one device as they were.
    restored = restore_run(run_dir=str(tmp_path / "run"), single_device=True)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params), jax.device_get(summary.params))


# ---------------------------------------------------------------- the attention alone


def _mesh(**sizes) -> Mesh:
    shape = [sizes.get(name, 1) for name in axes.NAMES]
    return Mesh(np.asarray(jax.devices()).reshape(shape), axes.NAMES, axis_types=(AxisType.Auto,) * len(shape))


def _packed_inputs(*, B=4, H=4, K=2, Dh=8, seed=0):
    """q, k, v and a weighting of the output, with segment ids and in-document positions of packed rows
    whose documents cross chunk boundaries (row 0: 20 | 30 | 14 tokens, row 1: 7 | 57, rows 2-3: one)."""
    rng = np.random.default_rng(seed)
    q, w = (jnp.asarray(rng.normal(size=(B, T, H, Dh)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(B, T, K, Dh)), jnp.float32) for _ in range(2))
    lengths = [[20, 30, 14], [7, 57], [T], [T]]
    seg = np.concatenate([np.repeat(np.arange(1, len(row) + 1), row)[None] for row in lengths]).astype(np.int32)
    pos = np.concatenate([np.concatenate([np.arange(n) for n in row])[None] for row in lengths]).astype(np.int32)
    return q, k, v, w, seg, pos


@functools.lru_cache(maxsize=None)
def _sharded_value_and_grads(strategy: str, mesh_items: tuple, local=None):
    """The jitted (output, gradients of sum(out * w) w.r.t. q, k, v) of a strategy on a mesh; token
    order, segment ids and positions are arguments, so balanced and in-order runs share one compile."""
    mesh = _mesh(**dict(mesh_items))
    parallel = SequenceParallel(strategy, "sequence", mesh.shape["sequence"], balanced=False)

    def attend(q, k, v, seg, pos):
        with mesh_lib.activation_sharding(mesh), attention_lib.sequence_parallel(parallel):
            if local is None:
                return attention_lib.kernel("xla", q.dtype)(q, k, v, seg, pos)
            return attention_lib.ulysses_attention(q, k, v, seg, pos, axis="sequence", local=local)

    def loss(q, k, v, w, seg, pos):
        out = attend(q, k, v, seg, pos)
        return jnp.sum(out * w), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _check_against_reference(strategy, mesh_items, *, balanced, local=None, inputs=None):
    """The strategy's output and q, k, v gradients on reordered tokens (as the step gets them) against
    the one-device reference in token order, within 1e-5."""
    q, k, v, w, seg, pos = inputs or _packed_inputs()
    # The token order the step would use for this config (ulysses keeps natural order either way).
    cfg = config_lib.load(None, [*SMALL, f"model.seq_len={T}", f"mesh.sequence_strategy={strategy}",
                                 f"mesh.sequence_load_balance={str(balanced).lower()}"])
    order = token_order(T, sequence_lib.resolve(cfg, _mesh(**dict(mesh_items))))
    perm = np.arange(T) if order is None else order
    (_, out), grads = _sharded_value_and_grads(strategy, mesh_items, local)(
        *(x[:, perm] for x in (q, k, v, w)), jnp.asarray(seg[:, perm]), jnp.asarray(pos[:, perm]))
    (_, ref_out), ref_grads = jax.value_and_grad(
        lambda q, k, v: (jnp.sum(reference_attention(q, k, v, jnp.asarray(seg)) * w),
                         reference_attention(q, k, v, jnp.asarray(seg))), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    inverse = np.argsort(perm)
    for got, want in zip((out, *grads), (ref_out, *ref_grads)):
        got = np.asarray(got)[:, inverse]  # back to token order
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("balanced", [True, False], ids=["balanced", "in order"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_attention_and_its_gradients_match_one_device(strategy, balanced):
    _check_against_reference(strategy, (("fsdp", 2), ("sequence", 4)), balanced=balanced)


@pytest.mark.parametrize("strategy", ["all_gather", "ring"])
def test_attention_with_tensor_parallel_heads(strategy):
    _check_against_reference(strategy, (("fsdp", 2), ("sequence", 2), ("tensor", 2)), balanced=True)


@pytest.mark.slow  # Pallas interpret mode: ~1 min on 2 cores
def test_splash_inside_ulysses_matches_one_device():
    """Ulysses runs the fused kernels on whole sequences: splash here in Pallas interpret mode."""
    splash = functools.partial(attention_lib.splash_kernel, interpret=True)
    rng = np.random.default_rng(1)
    B, n, H, K, Dh = 2, 128, 4, 2, 8
    q, w = (jnp.asarray(rng.normal(size=(B, n, H, Dh)), jnp.float32) for _ in range(2))
    k, v = (jnp.asarray(rng.normal(size=(B, n, K, Dh)), jnp.float32) for _ in range(2))
    seg = np.repeat(np.asarray([[1, 2], [1, 1]]), [50, 78], axis=1).astype(np.int32)
    pos = np.stack([np.concatenate([np.arange(50), np.arange(78)]), np.arange(n)]).astype(np.int32)
    mesh_items = (("fsdp", 2), ("sequence", 4))
    (_, out), grads = _sharded_value_and_grads("ulysses", mesh_items, splash)(q, k, v, w, jnp.asarray(seg), jnp.asarray(pos))
    ref = jax.value_and_grad(lambda q, k, v: jnp.sum(reference_attention(q, k, v, jnp.asarray(seg)) * w),
                             argnums=(0, 1, 2))
    _, ref_grads = ref(q, k, v)
    np.testing.assert_allclose(out, reference_attention(q, k, v, jnp.asarray(seg)), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(np.abs(r).max()))


@pytest.mark.aot_tpu
def test_aot_tpu_ulysses_runs_splash_per_device():
    needs_extra("libtpu", "tpu")
    report = run_worker("tpu_ulysses")
    assert report["splash_kernel_calls"] > 0 and report["all_to_all"] >= 4, report


@pytest.mark.aot_gpu
def test_aot_h100_ulysses_runs_cudnn_per_device():
    needs_extra("jax_plugins.xla_cuda12", "gpu")
    needs_extra("nvidia.cudnn", "gpu")
    report = run_worker("cuda_ulysses")
    assert report["cudnn_calls"] > 0 and report["all_to_all"] >= 4, report


# ---------------------------------------------------------------- load balance


def _live_blocks_per_device(seg, pos, order, size: int) -> list[int]:
    """Sub-blocks each device computes (the ring or the gathered blocks: device i's queries against
    every device's keys), counted with the predicate the kernels skip by."""
    seg, pos = seg[:, order], pos[:, order]
    n = seg.shape[1] // size
    block = lambda x, i: x[:, i * n:(i + 1) * n]  # noqa: E731
    return [sum(blockwise.live_blocks(block(seg, i), block(pos, i), block(seg, j), block(pos, j)) for j in range(size))
            for i in range(size)]


def test_balanced_order_gives_every_device_the_same_work():
    size = 4
    seg = np.ones((1, T), np.int32)
    pos = np.arange(T, dtype=np.int32)[None]
    balanced = _live_blocks_per_device(seg, pos, token_order(T, SequenceParallel("ring", "sequence", size, True)), size)
    in_order = _live_blocks_per_device(seg, pos, np.arange(T), size)
    # 2S = 8 chunks: device i holds chunks i and 7 - i, which see i + 1 and 8 - i chunks of keys.
    assert balanced == [2 * size + 1] * size
    assert in_order == [3, 7, 11, 15]  # chunks 2i and 2i + 1 see 4i + 3
    assert in_order[-1] / np.mean(in_order) == pytest.approx(15 / 9)  # (4S - 1) / (2S + 1): 2x as S grows
    # Score by score (finer than blocks) the last device does (2S - 1) / S = 1.75 x the average.
    scores = [int(np.tril(np.ones((T, T)))[i * 16:(i + 1) * 16].sum()) for i in range(size)]
    assert scores[-1] / np.mean(scores) == pytest.approx(1.75, rel=0.05)
    # Packed documents: balance is no longer exact, but far better than in order.
    _, _, _, _, seg, pos = _packed_inputs()
    packed = _live_blocks_per_device(seg, pos, token_order(T, SequenceParallel("ring", "sequence", size, True)), size)
    assert max(packed) / min(packed) < 1.5 < in_order[-1] / in_order[0]


def test_ulysses_needs_no_reorder():
    """After its all-to-all every device attends whole sequences of its heads: balanced by construction."""
    cfg = config_lib.load(None, [*SMALL, *SEQ4, "model.seq_len=64", "mesh.sequence_strategy=ulysses"])
    steps = build_steps(cfg, mesh_lib.make_mesh(cfg.mesh))
    assert steps.token_order is None
    ring = config_lib.load(None, [*SMALL, *SEQ4, "model.seq_len=64", "mesh.sequence_strategy=ring"])
    order = build_steps(ring, mesh_lib.make_mesh(ring.mesh)).token_order
    assert sorted(order) == list(range(64)) and list(order[:16]) == [*range(8), *range(56, 64)]


# ---------------------------------------------------------------- compiled collectives


def _gathers_of_keys(hlo: str) -> list[str]:
    """Result shapes of all-gathers with a sequence-long axis and head_dim last: gathered K/V."""
    shapes = re.findall(r"= \w+\[([\d,]+)\][^=]* all-gather(?:-start)?\(", hlo)
    head_dim = 32 // 4
    return [s for s in shapes if f",{T}," in f",{s}," and s.endswith(f",{head_dim}")]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.slow
def test_compiled_step_has_the_strategy_collectives(strategy):
    cfg = config_lib.load(None, [*SMALL, *SEQ4, f"model.seq_len={T}", f"mesh.sequence_strategy={strategy}",
                                 "train.micro_batch_size=8"])
    hlo = compile_train_step(cfg, build_steps(cfg, mesh_lib.make_mesh(cfg.mesh))).as_text()
    counts = collective_counts(hlo)
    if strategy == "ulysses":
        assert counts["all-to-all"] >= 4 and not _gathers_of_keys(hlo)  # q, k, v there and the output back
    elif strategy == "ring":
        assert counts["collective-permute"] > 0 and not _gathers_of_keys(hlo)
    else:
        assert _gathers_of_keys(hlo) and counts["collective-permute"] == 0 and counts["all-to-all"] == 0


# ---------------------------------------------------------------- generation on the mesh


def test_generation_on_a_sequence_mesh_gives_the_same_tokens(tmp_path, data_dir):
    cfg = small_config(tmp_path, data_dir, *SEQ4, "model.init_std=0.3")
    steps = build_steps(cfg, mesh_lib.make_mesh(cfg.mesh))
    params = steps.init().params
    prompts = [list(np.random.default_rng(i).integers(3, 300, n)) for i, n in enumerate((5, 2, 8, 3))]
    # The 8-token prompt batch and the 32-slot cache both split over sequence=4.
    sharded = gen.generate(params, steps.graphdef, prompts, max_new_tokens=6, max_len=32, eos_id=None, mesh=steps.mesh)
    local = jax.device_put(jax.device_get(params), jax.devices()[0])
    assert sharded == gen.generate(local, steps.graphdef, prompts, max_new_tokens=6, max_len=32, eos_id=None)


# ---------------------------------------------------------------- errors


BAD_INPUT = {
    "seq_len not divisible by 2 x sequence": (
        ["model.seq_len=36"], "error: model.seq_len=36 cannot be split into 2 x mesh.sequence = 8 chunks "
        "(mesh.sequence_load_balance=true); use a multiple of 8"),
    "seq_len not divisible by sequence": (
        ["model.seq_len=30", "mesh.sequence_load_balance=false"],
        "error: model.seq_len=30 cannot be split into mesh.sequence=4; use a multiple of 4"),
    "ulysses with heads that do not divide": (
        ["model.n_heads=2", "model.n_kv_heads=2", "mesh.sequence_strategy=ulysses"],
        "error: mesh.sequence_strategy=ulysses splits model.n_heads=2 over tensor x sequence = 4 devices, which "
        "does not divide them; use mesh.sequence_strategy=ring or all_gather, or a head count divisible by 4"),
    "unknown strategy": (
        ["mesh.sequence_strategy=spiral"],
        "error: mesh.sequence_strategy='spiral' is not allowed; choose one of: auto, all_gather, ulysses, ring"),
    "splash outside ulysses": (
        ["model.attention=splash", "mesh.sequence_strategy=ring"],
        "error: with mesh.sequence=4, model.attention=splash runs only inside ulysses, not "
        "mesh.sequence_strategy=ring; use model.attention=xla (all_gather, ring) or mesh.sequence_strategy=ulysses"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line(case, capsys):
    overrides, message = BAD_INPUT[case]
    assert run_cli(lambda: plan_main([*SMALL, *SEQ4, "model.seq_len=64", *overrides])) == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]


@pytest.mark.slow
def test_train_entry_point_exits_2_on_bad_sequence_config(subprocess_env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llmx.train", *SMALL, *SEQ4, "model.seq_len=36",
                           f"train.run_dir={tmp_path}"], cwd=REPO, env=subprocess_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == BAD_INPUT["seq_len not divisible by 2 x sequence"][1]


def test_max_seq_len_needs_a_target_with_known_memory():
    with pytest.raises(ConfigError, match="--max-seq-len needs a --target"):
        longest_seq_len(config_lib.load(None, SMALL), target="current")


@pytest.mark.parametrize("attention", ["linear", "quadratic"])
def test_max_seq_len_search_finds_the_boundary_in_few_compiles(attention, monkeypatch):
    """The search on a memory model (no compiles): 1 GiB of state plus activations linear in seq_len,
    or with a quadratic attention term; it must land on the last fitting multiple of 512."""
    hbm, state = 16 * 2**30, 2**30
    chip = targets.Chip("fake", hbm_bytes=hbm, peak_bf16_flops=1e15, hbm_bytes_per_second=1e12)
    monkeypatch.setattr(targets, "resolve", lambda spec: targets.Target(spec, chip, jax.devices()[:1]))
    memory = {"linear": lambda t: state + 300e3 * t, "quadratic": lambda t: state + 100e3 * t + 8 * t * t}[attention]

    def fake_plan(cfg, *, target, resolved):
        peak = memory(cfg.model.seq_len)
        return {"seq_len": cfg.model.seq_len, "mesh": {}, "state_bytes": {"total": state},
                "compiled_bytes": {"peak_estimate": peak}, "activation_bytes": peak - state,
                "memory": {"hbm_bytes": hbm, "fits": peak <= hbm, "shortfall_bytes": max(0.0, peak - hbm)}}

    monkeypatch.setattr(plan_lib, "plan", fake_plan)
    found = longest_seq_len(config_lib.load(None, [*SMALL, "model.seq_len=2048"]), target="fake")
    want = max(t for t in range(512, 2**20, 512) if memory(t) <= hbm)
    assert found["max_seq_len"] == want
    assert len(found["probes"]) <= 7, found["probes"]
