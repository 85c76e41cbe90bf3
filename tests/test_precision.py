"""Mixed precision: how train.precision sets the compute dtype, and bf16 tracking fp32."""

import jax
import numpy as np
import pytest

from helpers import small_config
from llmx import config as config_lib
from llmx.benchmark import synthetic_batch
from llmx.errors import ConfigError
from llmx.mesh import make_mesh
from llmx.step import build_steps
from llmx.train import train

SMALL_MODEL = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
               "model.n_kv_heads=2", "model.d_ff=48", "model.seq_len=16", "train.micro_batch_size=4",
               "train.steps=100", "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=1e-2"]


@pytest.mark.parametrize(
    "overrides, dtype",
    [([], "float32"), (["train.precision=bf16"], "bfloat16"), (["train.precision=fp16"], "float16"),
     (["train.precision=bf16", "model.dtype=float32"], "float32"),  # an explicit value wins
     (["model.dtype=bfloat16"], "bfloat16")],
)
def test_precision_sets_the_compute_dtype(overrides, dtype):
    assert config_lib.load(None, overrides).model.dtype == dtype


@pytest.mark.parametrize(
    "overrides, message",
    [(["model.dtype=float16"], "needs|underflow"), (["train.precision=fp16", "model.dtype=bfloat16"], "fp16 computes")],
)
def test_contradicting_precision_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.load(None, overrides)


@pytest.mark.slow
def test_bf16_training_tracks_fp32(tmp_path, data_dir):
    common = ["train.steps=30", "optim.lr=3e-3"]
    fp32 = train(small_config(tmp_path / "fp32", data_dir, *common))
    bf16 = train(small_config(tmp_path / "bf16", data_dir, *common, "train.precision=bf16"))
    l32, l16 = fp32.losses, bf16.losses
    assert l16[30] < 0.8 * l16[1]
    np.testing.assert_allclose([l16[s] for s in sorted(l16)], [l32[s] for s in sorted(l32)], rtol=0.03)
    assert abs(bf16.final_eval_loss - fp32.final_eval_loss) < 0.02 * fp32.final_eval_loss


def test_offload_optimizer_is_a_no_op_on_cpu():
    cfg = config_lib.load(None, [*SMALL_MODEL, "mesh.offload_optimizer=true"])
    steps = build_steps(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    kinds = {s.memory_kind for s in jax.tree.leaves(steps.state_shardings.opt_state)}
    assert kinds <= {None, "device", "unpinned_host"}
    state, m = steps.train(steps.init(), synthetic_batch(cfg, steps.mesh))
    assert np.isfinite(float(m["loss"]))
