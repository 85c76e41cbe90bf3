import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmx import config as config_lib
from llmx import models
from llmx.attention import attention_mask
from llmx.errors import ConfigError
from llmx.models import layers

SMALL_MODEL = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
               "model.n_kv_heads=2", "model.d_ff=48", "model.seq_len=16"]


def make(*overrides, seed=0):
    cfg = config_lib.load(None, [*SMALL_MODEL, *overrides]).model
    return cfg, models.get(cfg.family).build(cfg, rngs=nnx.Rngs(seed))


def test_shapes_and_logical_axes():
    cfg, model = make()
    tokens = jnp.zeros((3, 16), jnp.int32)
    logits = model(tokens)
    assert logits.shape == (3, 16, 64) and logits.dtype == jnp.float32
    params = nnx.state(model, nnx.Param)
    assert params["blocks"]["attn"]["wq"][...].shape == (2, 32, 4, 8)  # (L, D, H, Dh)
    assert params["blocks"]["attn"]["wk"][...].shape == (2, 32, 2, 8)  # (L, D, K, Dh)
    specs = nnx.get_partition_spec(params)
    assert tuple(specs["blocks"]["mlp"]["w_gate"].get_value()) == ("layers", "embed", "mlp")
    assert tuple(specs["embed"].get_value()) == ("vocab", "embed")
    n = sum(x.size for x in jax.tree.leaves(params))
    D, F, V, L = 32, 48, 64, 2
    expected = V * D * 2 + D + L * (2 * D + D * 4 * 8 + 2 * D * 2 * 8 + 4 * 8 * D + 3 * D * F)
    assert n == expected


def test_unknown_family_is_a_one_line_error_naming_the_known_ones():
    with pytest.raises(ConfigError) as err:
        models.get("gpt2")
    assert "\n" not in str(err.value) and "'gpt2'" in str(err.value) and "llama, mixtral" in str(err.value)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_matmul_params_are_the_modules_matmul_weights(tied):
    """The FLOPs arithmetic counts every parameter but the norms' scales and the embedding lookup (a
    tied embedding counts once, as the output projection)."""
    cfg, model = make(f"model.tie_embeddings={str(tied).lower()}")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    total = sum(x.size for x in jax.tree.leaves(params))
    norms = sum(x.size for x in jax.tree.leaves([params["final_norm"], params["blocks"]["attn_norm"],
                                                 params["blocks"]["mlp_norm"]]))
    lookup = 0 if tied else params["embed"].size
    family = models.get("llama")
    assert family.matmul_params(cfg) == total - norms - lookup
    L, H, Dh, T = 2, 4, 8, 16
    assert family.flops_per_token(cfg) == 6 * (total - norms - lookup) + 6 * L * H * Dh * T


def test_tied_embeddings_have_no_output_matrix():
    _, model = make("model.tie_embeddings=true")
    assert not hasattr(model, "unembed")
    assert model(jnp.ones((1, 16), jnp.int32)).shape == (1, 16, 64)


def test_attention_mask_is_causal_and_per_document():
    seg = jnp.array([[1, 1, 2, 2, 2, 0]])
    mask = np.asarray(attention_mask(seg, seg))[0]
    expected = np.array([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], bool)
    np.testing.assert_array_equal(mask, expected)


def test_no_token_sees_the_future_or_another_document():
    _, model = make()
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, 64, (1, 16)), jnp.int32)
    segments = jnp.asarray([[1] * 6 + [2] * 10])
    positions = jnp.asarray([list(range(6)) + list(range(10))])
    base = model(tokens, segments, positions)
    # Changing a token of document 2 leaves every logit of document 1 unchanged...
    changed = model(tokens.at[0, 9].set((tokens[0, 9] + 1) % 64), segments, positions)
    np.testing.assert_array_equal(base[0, :6], changed[0, :6])
    # ...and positions before it in document 2, but changes the logits at and after it.
    np.testing.assert_array_equal(base[0, 6:9], changed[0, 6:9])
    assert not np.allclose(base[0, 9:], changed[0, 9:])
    # Changing a token of document 1 leaves document 2 unchanged.
    changed = model(tokens.at[0, 2].set((tokens[0, 2] + 1) % 64), segments, positions)
    np.testing.assert_array_equal(base[0, 6:], changed[0, 6:])
    np.testing.assert_array_equal(base[0, :2], changed[0, :2])


def test_packed_document_equals_it_alone():
    """A document packed behind another gives the logits it gets on its own (positions restart)."""
    _, model = make()
    rng = np.random.default_rng(1)
    doc = jnp.asarray(rng.integers(3, 64, (1, 10)), jnp.int32)
    prefix = jnp.asarray(rng.integers(3, 64, (1, 6)), jnp.int32)
    packed = jnp.concatenate([prefix, doc], axis=1)
    segments = jnp.asarray([[1] * 6 + [2] * 10])
    positions = jnp.asarray([list(range(6)) + list(range(10))])
    alone = model(doc)
    np.testing.assert_allclose(model(packed, segments, positions)[:, 6:], alone, atol=1e-5)


def _loss_and_grads(model, tokens):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
        logits = nnx.merge(graphdef, p)(tokens)
        return -jnp.mean(jax.nn.log_softmax(logits)[:, :-1].max(-1))

    return jax.jit(jax.value_and_grad(loss))(params)


SCANNED = "model.scan_layers=true"


@pytest.mark.parametrize("variant", [
    ["model.scan_layers=false"], ["model.scan_layers=auto"], [SCANNED, "model.remat=full"],
    [SCANNED, "model.remat=dots_saveable"], [SCANNED, "model.remat=dots_with_no_batch_dims_saveable"],
    [SCANNED, "model.remat=offload"], ["model.scan_layers=false", "model.remat=dots_saveable"],
], ids=lambda v: ",".join(o.split(".")[1] for o in v))
@pytest.mark.slow
def test_layer_loop_and_remat_variants_match_scan(variant):
    tokens = jnp.asarray(np.random.default_rng(2).integers(3, 64, (2, 16)), jnp.int32)
    ref_loss, ref_grads = _loss_and_grads(make(SCANNED)[1], tokens)
    loss, grads = _loss_and_grads(make(*variant)[1], tokens)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)


def test_scan_layers_auto_unrolls_on_cpu_only_and_up_to_the_bound():
    deep = layers.UNROLL_ON_CPU_MAX_LAYERS
    assert not layers.scans("auto", 4, "cpu", devices=1) and not layers.scans("auto", deep, "cpu", devices=1)
    assert layers.scans("auto", deep + 1, "cpu", devices=1)  # compile time grows with unrolled depth
    assert layers.scans("auto", 4, "tpu") and layers.scans("auto", 4, "gpu")  # accelerators keep the scan
    assert layers.scans("auto", 4, "cpu", remat="full")  # unrolled, XLA:CPU undoes checkpointing policies
    assert layers.scans("auto", 4, "cpu", devices=8)  # ZeRO-3 gathers a layer per loop iteration
    assert layers.scans("true", 4, "cpu") and layers.scans(True, 4, "cpu") and not layers.scans("false", 4, "tpu")
    # YAML's booleans (scan_layers: false, or model.scan_layers=false on the command line) still work
    assert config_lib.load(None, ["model.scan_layers=false"]).model.scan_layers == "false"
    assert config_lib.from_dict({"model": {"scan_layers": True}}).model.scan_layers == "true"
    with pytest.raises(ConfigError, match="scan_layers='sometimes' is not allowed; choose one of: auto, true, false"):
        config_lib.load(None, ["model.scan_layers=sometimes"])


def test_rope_reads_a_table_on_cpu_that_equals_the_computed_angles(monkeypatch):
    x = jax.random.normal(jax.random.key(0), (2, 8, 3, 16))
    positions = jnp.asarray(np.random.default_rng(0).integers(0, 4096, (2, 8)), jnp.int32).at[0, :2].set([0, 5])

    def rope(x, p):
        return layers.rope(x, p, theta=10000.0, max_position=4096)

    assert "cos" not in str(jax.make_jaxpr(rope)(x, positions))  # looked up, not computed
    table = rope(x, positions)
    # Never silent: a position past the table reads NaN (clamped onto the table's NaN row), the others angles.
    short = np.asarray(layers.rope(x, positions, theta=10000.0, max_position=8))
    past = np.asarray(positions) >= 8
    assert past.any() and (~past).any()
    assert np.isnan(short[past]).all() and np.isfinite(short[~past]).all()
    np.testing.assert_array_equal(short[~past], np.asarray(table)[~past])
    monkeypatch.setattr(layers, "traced_platform", lambda: "tpu")  # what an AOT trace for a TPU sees
    assert "cos" in str(jax.make_jaxpr(lambda x, p: rope(x, p))(x, positions))
    np.testing.assert_allclose(table, layers.rope(x, positions, theta=10000.0, max_position=4096), rtol=0, atol=2e-6)


def test_bf16_mlp_rounds_its_projections_and_its_gradient_needs_less_memory():
    """In bf16 the MLP takes the SwiGLU of its gate and up projections rounded to bf16 (in fp32), as the other
    projections are rounded: the compiled gradient then keeps less in temporaries than with the fp32 dot
    outputs (the formula before, written out below with the same matmuls)."""
    from llmx.models import lora

    cfg, _ = make("train.precision=bf16", "model.d_ff=256")
    mlp = layers.MLP(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(mlp)
    x = jax.random.normal(jax.random.key(1), (8, 64, cfg.d_model)).astype(jnp.bfloat16)

    def swiglu(m, x, dtype):
        gate = lora.project(m, "w_gate", "btd,df->btf", x).astype(dtype).astype(jnp.float32)
        up = lora.project(m, "w_up", "btd,df->btf", x).astype(dtype).astype(jnp.float32)
        hidden = (jax.nn.silu(gate) * up).astype(jnp.bfloat16)
        return lora.project(m, "w_down", "btf,fd->btd", hidden).astype(jnp.bfloat16)

    np.testing.assert_array_equal(np.asarray(mlp(x), np.float32), np.asarray(swiglu(mlp, x, jnp.bfloat16), np.float32))

    def temp_bytes(forward):
        def loss(params, x):
            return forward(nnx.merge(graphdef, params), x).astype(jnp.float32).sum()

        return jax.jit(jax.grad(loss)).lower(params, x).compile().memory_analysis().temp_size_in_bytes

    ours = temp_bytes(lambda m, x: m(x))
    fp32_projections = temp_bytes(lambda m, x: swiglu(m, x, jnp.float32))
    assert ours < 0.95 * fp32_projections, (ours, fp32_projections)  # 0.89x when written


def test_gqa_equals_mha_with_repeated_kv_heads():
    """GQA with K kv heads is MHA whose key/value heads are each repeated H/K times."""
    cfg, gqa = make()
    _, mha = make("model.n_kv_heads=4")
    for name in ("wk", "wv"):
        kv = getattr(gqa.blocks.attn, name)[...]  # (L, D, K, Dh)
        getattr(mha.blocks.attn, name)[...] = jnp.repeat(kv, 2, axis=2)
    for name in ("wq", "wo"):
        getattr(mha.blocks.attn, name)[...] = getattr(gqa.blocks.attn, name)[...]
    for name in ("w_gate", "w_up", "w_down"):
        getattr(mha.blocks.mlp, name)[...] = getattr(gqa.blocks.mlp, name)[...]
    mha.embed[...] = gqa.embed[...]
    mha.unembed[...] = gqa.unembed[...]
    tokens = jnp.asarray(np.random.default_rng(3).integers(3, 64, (2, 16)), jnp.int32)
    np.testing.assert_allclose(mha(tokens), gqa(tokens), atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.slow
def test_remat_policies_order_the_compiled_steps_temporary_memory(precision):
    """Activations dominate this config (long sequences, narrow model): each policy saves less than
    the one before, in bf16 too (its matmuls sit inside custom VJPs, which jax's own dots_saveable
    policies cannot see; llmx names them). Measured (MiB, fp32, one CPU device, so model.attention=auto is
    the cpu flash kernel, whose saved output and log-sum-exp are named like the einsums): none 47,
    dots_saveable 32, dots_with_no_batch_dims_saveable 30, full 16 (with xla attention: 142, 88, 50, 42)."""
    from llmx.mesh import make_mesh
    from llmx.plan import compile_train_step
    from llmx.step import build_steps

    temp = {}
    for policy in ("none", "dots_saveable", "dots_with_no_batch_dims_saveable", "full"):
        cfg = config_lib.load(None, ["model.vocab_size=64", "model.d_model=64", "model.n_layers=4", "model.n_heads=4",
                                     "model.d_ff=128", "model.seq_len=256", "train.micro_batch_size=8",
                                     f"model.remat={policy}", f"train.precision={precision}"])
        steps = build_steps(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
        temp[policy] = compile_train_step(cfg, steps).memory_analysis().temp_size_in_bytes
    assert temp["full"] < 0.6 * temp["none"], temp
    assert temp["full"] < temp["dots_with_no_batch_dims_saveable"] < temp["dots_saveable"] < temp["none"], temp
