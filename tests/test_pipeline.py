"""Pipeline parallelism (`llmx.pipeline`): pipelined layouts train like one device, a checkpoint moves
between pipelined and plain meshes, evaluation and generation run on a pipelined mesh, the compiled
step sends activations between stages and gathers a stage's weights once, and the arithmetic errors
are one line (exit 2: rows of tests/test_faults.py)."""

import dataclasses
import logging
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import SMALL, needs_extra, small_config
from llmx import config as config_lib
from llmx import evaluate as evaluate_lib
from llmx import generate as gen
from llmx import mesh as mesh_lib
from llmx.errors import ConfigError
from llmx.pipeline import Schedule
from llmx.plan import compile_train_step, format_plan, plan
from llmx.step import build_steps
from llmx.train import train
from test_plan_aot import ONE_B, run_plan

GLOBAL_BATCH = 16
LAYERS = "model.n_layers=4"  # divisible by every stages x repeats below
# constant: a run resumed with fewer train.steps takes the same steps (a cosine schedule depends on them)
COMMON = [LAYERS, "train.steps=20", "optim.schedule=constant", "checkpoint.async_save=false"]
PIPELINED = ["mesh.pipeline=4", "mesh.data=1", "mesh.fsdp=2", "mesh.zero_stage=3", "train.grad_accum_steps=4",
             "train.micro_batch_size=2"]
PLAIN = ["mesh.pipeline=1", "mesh.data=1", "mesh.fsdp=8", "mesh.zero_stage=3", "train.grad_accum_steps=1",
         "train.micro_batch_size=2"]  # the same 16 rows per step
LAYOUTS = {  # micro_batch_size x grad_accum_steps x data x fsdp = GLOBAL_BATCH
    "pipeline=4 fsdp=2 zero3": [*PIPELINED, "checkpoint.every=10"],  # its step 10 resumes without stages
    "pipeline=2 tensor=2 fsdp=2 zero2": ["mesh.pipeline=2", "mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2",
                                         "mesh.zero_stage=2", "train.grad_accum_steps=2", "train.micro_batch_size=4"],
    # M = 2S: the last stage's outputs wait in stage 0's buffer before the second repeat; ZeRO-3 shards
    # gathered layer by layer in every iteration.
    "pipeline=2 repeats=2 data=2 fsdp=2 zero3 gathered per iteration": [
        "mesh.pipeline=2", "mesh.pipeline_repeats=2", "mesh.data=2", "mesh.fsdp=2", "mesh.zero_stage=3",
        "mesh.pipeline_gather_weights_once=false", "train.grad_accum_steps=4", "train.micro_batch_size=1"],
}


class _Collect(logging.Handler):
    def __init__(self, records: list):
        super().__init__(logging.INFO)
        self.records = records

    def emit(self, record):
        self.records.append(record.getMessage())


@dataclasses.dataclass
class Run:
    run_dir: Path
    losses: dict  # step -> loss
    params: dict  # final, on the host
    log: str  # what llmx logged at INFO


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """20 fp32 steps on one device and on each pipelined layout, the same 16 rows per step: name -> Run."""
    out, logger, records = {}, logging.getLogger("llmx"), []
    handler, level = _Collect(records), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for name, overrides in {"1 device": [f"train.micro_batch_size={GLOBAL_BATCH}"], **LAYOUTS}.items():
            tmp, records[:] = tmp_path_factory.mktemp("run"), []
            summary = train(small_config(tmp, data_dir, *COMMON, *overrides),
                            devices=jax.devices()[:1] if name == "1 device" else None)
            out[name] = Run(tmp / "run", summary.losses, jax.device_get(summary.params), "\n".join(records))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return out


def _sorted(losses: dict) -> list:
    return [losses[s] for s in sorted(losses)]


@pytest.mark.slow
def test_pipelined_layouts_train_like_one_device(runs):
    ref = runs["1 device"]
    assert sorted(ref.losses) == list(range(1, 21)) and "pipeline:" not in ref.log
    for name in LAYOUTS:
        run = runs[name]
        np.testing.assert_allclose(_sorted(run.losses), _sorted(ref.losses), rtol=1e-5, err_msg=name)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6, err_msg=name),
                     run.params, ref.params)
    # The start-up log: the schedule and its bubble, and what a device sends.
    assert "pipeline: 4 stages x 1 repeats, 4 micro-batches, 7 iterations, bubble (S-1)/(R*M+S-1) = 42.9%" in (
        runs["pipeline=4 fsdp=2 zero3"].log)
    assert "pipeline: 2 stages x 2 repeats, 4 micro-batches, 9 iterations, bubble (S-1)/(R*M+S-1) = 11.1%" in (
        runs["pipeline=2 repeats=2 data=2 fsdp=2 zero3 gathered per iteration"].log)
    assert "FSDP alone would gather" in runs["pipeline=2 tensor=2 fsdp=2 zero2"].log


@pytest.mark.slow
def test_checkpoints_move_between_pipelined_and_plain_meshes(runs, tmp_path, data_dir):
    run_dir, losses = runs["pipeline=4 fsdp=2 zero3"].run_dir, runs["pipeline=4 fsdp=2 zero3"].losses
    # Resumed from step 10 without stages, then from that run's step 11 with stages again.
    b = small_config(tmp_path / "b", data_dir, *COMMON, *PLAIN, "train.steps=11",
                     f"checkpoint.restore_from={run_dir / 'checkpoints' / '10'}")
    plain = train(b).losses
    c = small_config(tmp_path / "c", data_dir, *COMMON, *PIPELINED, "train.steps=12",
                     f"checkpoint.restore_from={tmp_path / 'b' / 'run'}")
    pipelined = train(c).losses
    assert sorted(plain) == [11] and sorted(pipelined) == [12]
    np.testing.assert_allclose([plain[11], pipelined[12]], [losses[11], losses[12]], rtol=1e-5)
    # The pipelined run's checkpoint evaluates on its own mesh as on one device (the same 4 rows per batch).
    _, staged = evaluate_lib.run_evaluation(run_dir=str(run_dir))
    _, single = evaluate_lib.run_evaluation(run_dir=str(run_dir), single_device=True,
                                            overrides=["train.micro_batch_size=4"])
    assert staged[0].tokens == single[0].tokens > 0
    np.testing.assert_allclose(staged[0].loss, single[0].loss, rtol=1e-5)


@pytest.mark.slow
def test_a_pipelined_mesh_generates_the_same_tokens(tmp_path, data_dir):
    cfg = small_config(tmp_path, data_dir, LAYERS, *PIPELINED, "model.init_std=0.3")
    mesh = mesh_lib.make_mesh(cfg.mesh)
    steps = build_steps(cfg, mesh)
    params = steps.init().params
    assert params["blocks"]["attn"]["wq"][...].sharding.spec[0] == "pipeline"  # layers split over stages
    prompts = [[5, 9, 14, 3], [7, 2], [11, 12, 13, 14, 15, 16]]
    staged = gen.generate(params, steps.graphdef, prompts, max_new_tokens=6, max_len=32, eos_id=None, mesh=mesh)
    local = jax.device_put(jax.device_get(params), jax.devices()[0])
    assert staged == gen.generate(local, steps.graphdef, prompts, max_new_tokens=6, max_len=32, eos_id=None)


# --------------------------------------------------------------------------- compiled HLO


def _loops(hlo: str) -> dict[str, tuple[str, int]]:
    """Every while loop's body computation -> (its parent computation, its trip count)."""
    loops, parent = {}, None
    for line in hlo.splitlines():
        if line.endswith("{") and not line.startswith(" "):
            parent = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
        m = re.search(r" while\(.*body=(%[\w.-]+).*\"known_trip_count\":\{\"n\":\"(\d+)\"", line)
        if m:
            loops[m.group(1)] = (parent, int(m.group(2)))
    return loops


def _collectives(hlo: str, kind: str) -> dict[str, list[str]]:
    """Computation -> the result shapes of its `kind` collectives."""
    found, name = {}, None
    for line in hlo.splitlines():
        if line.endswith("{") and not line.startswith(" "):
            name = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
        m = re.search(rf"= (\S+) {kind}(?:-start)?\(", line)
        if m:
            found.setdefault(name, []).append(m.group(1))
    return found


def _executions(hlo: str, kind: str) -> list[int]:
    """How many times one step runs each `kind` collective (the trip counts of the loops around it)."""
    loops = _loops(hlo)

    def runs(computation):
        n = 1
        while computation in loops:
            computation, trips = loops[computation]
            n *= trips
        return n

    return [runs(computation) for computation, shapes in _collectives(hlo, kind).items() for _ in shapes]


# One micro-batch row per device, M = 4 micro-batches through 4 stages: 7 iterations.
STAGED_STEP = [*SMALL, LAYERS, *PIPELINED[:-2], "train.grad_accum_steps=4", "train.micro_batch_size=1"]


def _hlo(*overrides):
    cfg = config_lib.load(None, [*STAGED_STEP, *overrides])
    return compile_train_step(cfg, build_steps(cfg, mesh_lib.make_mesh(cfg.mesh))).as_text()


WEIGHTS_PER_LAYER = 9  # 2 norm scales, wq, wk, wv, wo, w_gate, w_up, w_down
ITERATIONS = 4 + 4 - 1


@pytest.mark.slow
def test_stages_exchange_activations_and_gather_their_weights_once():
    hlo = _hlo()
    # Forward: each iteration sends its output (B, T, D) and the rows' segment ids and positions
    # (B, T) one stage on; backward: the output's gradient back.
    permutes = _executions(hlo, "collective-permute")
    assert sum(permutes) == 4 * ITERATIONS, permutes
    # Every all-gather (a stage's weights, the embedding, the head) runs once per step, outside the
    # loop over the M micro-batches; and each gradient is reduced once, after it.
    for kind in ("all-gather", "all-reduce", "reduce-scatter"):
        runs = _executions(hlo, kind)
        assert set(runs) <= {1}, (kind, runs)
    assert len(_executions(hlo, "all-gather")) >= WEIGHTS_PER_LAYER
    # Without gathering once, ZeRO-3 reduce-scatters each layer's gradients in every iteration (its
    # gathers of the loop-invariant weights XLA:CPU hoists out of the loop itself).
    hlo = _hlo("mesh.pipeline_gather_weights_once=false")
    assert sum(_executions(hlo, "reduce-scatter")) == WEIGHTS_PER_LAYER * ITERATIONS


# --------------------------------------------------------------------------- arithmetic and errors


def test_bubble_is_divided_by_repeats():
    assert Schedule(stages=4, repeats=1, micro_batches=4).bubble == pytest.approx(3 / 7)
    assert Schedule(stages=4, repeats=2, micro_batches=4).bubble == pytest.approx(3 / 11)
    assert Schedule(stages=2, repeats=2, micro_batches=8).iterations == 17


@pytest.mark.parametrize("overrides, message", [
    (["model.n_layers=6", "mesh.pipeline=4", "train.grad_accum_steps=4"],
     "model.n_layers=6 is not divisible by mesh.pipeline 4 x mesh.pipeline_repeats 1 = 4"),
    (["model.n_layers=4", "mesh.pipeline=2", "mesh.pipeline_repeats=4", "train.grad_accum_steps=2"],
     "model.n_layers=4 is not divisible by mesh.pipeline 2 x mesh.pipeline_repeats 4 = 8"),
    (["model.n_layers=4", "mesh.pipeline=4", "train.grad_accum_steps=2"],
     "train.grad_accum_steps=2 is smaller than mesh.pipeline=4"),
    (["mesh.pipeline_repeats=2"], "mesh.pipeline_repeats=2 needs mesh.pipeline > 1"),
])
def test_pipeline_arithmetic_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        config_lib.load(None, overrides)
    assert "\n" not in str(err.value)


def test_a_filled_pipeline_axis_is_checked_when_the_mesh_is_built():
    cfg = config_lib.load(None, [*SMALL, "mesh.pipeline=-1", "mesh.data=1", "mesh.fsdp=2"])  # 4 stages, 2 layers
    with pytest.raises(ConfigError, match=re.escape("model.n_layers=2 is not divisible by mesh.pipeline 4")):
        build_steps(cfg, mesh_lib.make_mesh(cfg.mesh))


def test_plan_reports_the_bubble_and_what_the_stages_send():
    p = plan(config_lib.load(None, STAGED_STEP))
    pipe = p["pipeline"]
    assert (pipe["stages"], pipe["repeats"], pipe["micro_batches"], pipe["iterations"]) == (4, 1, 4, 7)
    assert pipe["bubble"] == pytest.approx(3 / 7)
    assert pipe["sent_bytes_per_device"]["activations"] > 0 and pipe["fsdp_alone_weight_gathers"] > 0
    assert p["collectives"]["collective-permute"] > 0
    assert p["state_bytes"]["total"] == pytest.approx(p["zero_expected_bytes"]["total"], rel=0.05)
    assert "bubble (S-1)/(R*M+S-1) = 42.9%" in format_plan(p)


@pytest.mark.aot_tpu
def test_plan_1b_on_a_v5e_4x4_with_two_stages_halves_the_state():
    needs_extra("libtpu", "tpu")
    # --no-compile: the state's bytes and the schedule come from shapes and shardings; compiling the 1B
    # step for 16 TPU chips takes minutes (README: it fits, collective-permutes between the stages).
    on_16 = [*ONE_B, "--target", "v5e:4x4", "--no-compile"]
    staged = run_plan(*on_16, "mesh.pipeline=2", "train.grad_accum_steps=4")
    plain = run_plan(*on_16, "mesh.data=2", "train.grad_accum_steps=2")  # the same fsdp=8 and global batch
    assert staged["mesh"]["fsdp"] == plain["mesh"]["fsdp"] == 8 and staged["tokens_per_step"] == plain["tokens_per_step"]
    # The layers are 99.8 % of the weights; the embedding and output projection stay on both stages.
    assert staged["state_bytes"]["total"] == pytest.approx(plain["state_bytes"]["total"] / 2, rel=0.01)
    assert staged["state_bytes"]["total"] == pytest.approx(staged["zero_expected_bytes"]["total"], rel=0.01)
    pipe = staged["pipeline"]
    assert pipe["bubble"] == pytest.approx(1 / 5) and pipe["iterations"] == 5 and "pipeline" not in plain
    sent = pipe["sent_bytes_per_device"]
    assert sent["activations"] + sent["stage_weight_gathers"] < pipe["fsdp_alone_weight_gathers"]
    assert "bubble (S-1)/(R*M+S-1) = 20.0%" in format_plan(staged) and "compiled_bytes" not in staged
