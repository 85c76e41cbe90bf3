"""KV-cache generation: greedy decoding equals the argmax of the full forward pass token by token, for
ragged (left-padded) and equal-length prompt batches, on one device and on a sharded training mesh,
with one compilation per shape; sampling filters; the CLI with streaming and a prompt file."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmx import config as config_lib
from llmx import generate as gen
from llmx import mesh as mesh_lib
from llmx.data import ByteTokenizer
from llmx.models.llama import Llama
from llmx.step import build_steps

from helpers import small_config

MODEL = ["model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
         "model.n_kv_heads=2", "model.d_ff=48", "model.seq_len=32", "model.init_std=0.3"]


def make(*overrides):
    cfg = config_lib.load(None, [*MODEL, *overrides]).model
    model = Llama(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    return model, graphdef, params


@jax.jit(static_argnums=0)
def forward(graphdef, params, tokens):
    """The full forward pass, one compilation per model and token shape (not one per prompt)."""
    return nnx.merge(graphdef, params)(tokens)


def reference_greedy(model, prompt, n):
    """Greedy continuation by re-running the full forward pass over the whole sequence each step (one
    compiled shape: right-padded to the context, which causality keeps from touching earlier logits)."""
    graphdef, params = nnx.split(model)
    seq = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, model.cfg.seq_len), np.int32)
        padded[0, : len(seq)] = seq
        seq.append(int(jnp.argmax(forward(graphdef, params, padded)[0, len(seq) - 1])))
    return seq[len(prompt):]


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 64, n).tolist() for n in lengths]


@pytest.mark.parametrize(
    "lengths, overrides",
    [((5, 9, 1, 7), []), ((6, 6, 6), []), ((4, 8), ["model.scan_layers=true"])],
    ids=["ragged", "equal", "ragged-scanned"],  # the default on CPU unrolls the layers
)
def test_greedy_kv_cache_equals_full_forward_argmax(lengths, overrides):
    model, graphdef, params = make(*overrides)
    prompts = prompts_of(lengths)
    out = gen.generate(params, graphdef, prompts, max_new_tokens=8, max_len=32, eos_id=None)
    for prompt, new in zip(prompts, out):
        assert new == reference_greedy(model, prompt, 8)


def test_prefill_logits_equal_the_forward_pass_at_every_real_position():
    model, graphdef, params = make()
    prompts = prompts_of((3, 7))
    tokens, segment_ids, positions = gen.left_pad(prompts, pad_id=0)
    np.testing.assert_array_equal(segment_ids[0], [0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(positions[0, 4:], [0, 1, 2])
    logits, cache = model.decode(jnp.asarray(tokens), model.init_cache(2, 10), segment_ids=jnp.asarray(segment_ids),
                                 positions=jnp.asarray(positions), index=0)
    assert cache.k.shape == (2, 2, 10, 2, 8)  # (L, B, S, K, Dh)
    for row, prompt in enumerate(prompts):
        full = forward(graphdef, params, jnp.asarray([prompt], jnp.int32))[0]  # (T, V)
        np.testing.assert_allclose(logits[row, -len(prompt):], full, atol=1e-5)


def test_one_compilation_per_shape_not_per_step():
    _, graphdef, params = make("model.d_ff=40")  # a graphdef no other test compiled
    gen._decode_step.clear_cache()
    gen._prefill.clear_cache()
    gen.generate(params, graphdef, prompts_of((3, 5)), max_new_tokens=12, max_len=32, eos_id=None)
    assert gen._decode_step._cache_size() == 1 and gen._prefill._cache_size() == 1
    # Another prompt batch of the same shape reuses both.
    gen.generate(params, graphdef, prompts_of((2, 5), seed=1), max_new_tokens=12, max_len=32, eos_id=None,
                 temperature=0.7, top_k=5, top_p=0.9)
    assert gen._decode_step._cache_size() == 1 and gen._prefill._cache_size() == 1


@pytest.mark.slow
def test_sharded_training_mesh_generates_the_same_tokens(tmp_path, data_dir):
    cfg = small_config(tmp_path, data_dir, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "mesh.zero_stage=3",
                       "model.init_std=0.3")
    mesh = mesh_lib.make_mesh(cfg.mesh)
    steps = build_steps(cfg, mesh)
    params = steps.init().params
    assert not params["blocks"]["attn"]["wq"][...].sharding.is_fully_replicated
    prompts = prompts_of((5, 2, 8, 3), seed=3)
    sharded = gen.generate(params, steps.graphdef, prompts, max_new_tokens=6, max_len=32, eos_id=None, mesh=mesh)
    local = jax.device_put(jax.device_get(params), jax.devices()[0])
    single = gen.generate(local, steps.graphdef, prompts, max_new_tokens=6, max_len=32, eos_id=None)
    assert sharded == single


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 2000))  # (B, V)
    key = jax.random.key(0)

    def sample(**kw):
        args = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, **kw}
        return np.asarray(gen.sample_logits(logits, key, **{k: jnp.asarray(v) for k, v in args.items()}))

    assert set(sample(temperature=0.0)) == {0}
    assert set(sample(top_k=1)) == {0}
    assert set(sample(top_k=2)) == {0, 1}
    assert set(sample(top_p=0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8: the second token completes the nucleus
    assert set(sample(top_p=0.5)) == {0}
    assert set(sample()) == {0, 1, 2, 3}
    np.testing.assert_allclose(np.bincount(sample(), minlength=4) / 2000, [0.5, 0.3, 0.15, 0.05], atol=0.04)


def test_eos_stops_a_row_and_the_context_limit_stops_all():
    model, graphdef, params = make()
    prompt = prompts_of((4,))[0]
    free = gen.generate(params, graphdef, [prompt], max_new_tokens=6, max_len=32, eos_id=None)[0]
    stopped = gen.generate(params, graphdef, [prompt], max_new_tokens=6, max_len=32, eos_id=free[2])[0]
    assert stopped == free[: free.index(free[2])]
    assert len(gen.generate(params, graphdef, [prompt], max_new_tokens=100, max_len=10, eos_id=None)[0]) == 6


def test_stream_holds_back_partial_characters():
    tok, out = ByteTokenizer(), io.StringIO()
    stream = gen.TextStream(tok, out)
    for b in "hé!".encode("utf-8"):
        stream(np.array([b + 3]), np.array([False]))
        if b == 0xC3:  # the first byte of é alone is not printed
            assert out.getvalue() == "h"
    assert out.getvalue() == "hé!"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir):
    from llmx.train import train

    tmp = tmp_path_factory.mktemp("gen")
    summary = train(small_config(tmp, data_dir, "train.steps=2", "train.sample_tokens=5", "train.sample_prompt=def"))
    assert isinstance(summary.sample, str)  # the trainer's end-of-run sample, now on the KV-cache path
    return tmp / "run"


@pytest.mark.slow
def test_cli_streams_one_prompt_and_batches_a_prompt_file(trained_run, tmp_path, capsys):
    status = gen.main(["--run-dir", str(trained_run), "--prompt", "import ", "--max-new-tokens", "5",
                       "--temperature", "0"])
    assert status == 0
    streamed = capsys.readouterr().out
    assert streamed.startswith("import ")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import \ndef f(x):\n")
    assert gen.main(["--run-dir", str(trained_run), "--prompt-file", str(prompts), "--max-new-tokens", "5",
                     "--temperature", "0", "--single-device"]) == 0
    batched = capsys.readouterr().out
    assert batched.startswith("import ") and "\ndef f(x):" in batched and batched.count("-" * 40) == 2
