"""Hugging Face interop: logits and loss parity with transformers' LlamaForCausalLM in both directions,
the sharded safetensors index, one-line errors for unsupported options, and an imported run that the
trainer fine-tunes and the generator samples from."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx


from llmx import config as config_lib
from llmx import hf
from llmx.cli import run as run_cli
from llmx.errors import ConfigError
from llmx.models.llama import Llama
from llmx.step import loss_sums

from helpers import SMALL, read_metrics

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

VOCAB, T = 300, 12  # 300 >= the byte tokenizer's 259 ids, so imported runs can train and generate


def randomise_norms(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A small GQA Llama with untied embeddings, non-default RoPE base and random norm weights, fp32,
    saved as one file and as a sharded index."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
        initializer_range=0.15, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    model = transformers.LlamaForCausalLM(config).float().eval()
    randomise_norms(model, 0)
    single = tmp_path_factory.mktemp("hf") / "single"
    sharded = single.parent / "sharded"
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="20KB")
    return model, single, sharded


def tokens_batch(seed=0, batch=3):
    return np.random.default_rng(seed).integers(3, VOCAB, (batch, T)).astype(np.int32)


def hf_logits_and_loss(model, tokens):
    with torch.no_grad():
        out = model(torch.from_numpy(tokens.astype(np.int64)), labels=torch.from_numpy(tokens.astype(np.int64)))
    return out.logits.numpy(), float(out.loss)


def llmx_loss(model, tokens):
    """transformers' causal LM loss (mean over the T-1 shifted targets) through the trainer's loss."""
    graphdef, params = nnx.split(model)
    ones = np.ones_like(tokens[:, 1:])
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": ones,
             "positions": np.broadcast_to(np.arange(T - 1), ones.shape), "loss_mask": ones.astype(bool)}
    total, count = loss_sums(params, graphdef, batch)
    return float(total / count)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_import_matches_transformers_logits_and_loss(hf_model, layout):
    model, single, sharded = hf_model
    hf_dir = single if layout == "single" else sharded
    if layout == "sharded":
        assert (hf_dir / "model.safetensors.index.json").is_file() and len(list(hf_dir.glob("*.safetensors"))) > 1
    cfg, ours = hf.load(hf_dir)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.rope_theta, cfg.tie_embeddings) == (4, 2, 500.0, False)
    tokens = tokens_batch()
    expected, expected_loss = hf_logits_and_loss(model, tokens)
    logits = ours(jnp.asarray(tokens))
    assert logits.dtype == jnp.float32 and logits.shape == (3, T, VOCAB)
    assert np.abs(expected).max() > 1.0  # a test that could fail: logits far from zero
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
    assert llmx_loss(ours, tokens) == pytest.approx(expected_loss, abs=1e-5)


def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
    """An llmx-initialised model (tied embeddings, GQA) exported sharded gives transformers' logits."""
    cfg = config_lib.load(None, [
        f"model.vocab_size={VOCAB}", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "model.d_ff=48", "model.seq_len=64", "model.tie_embeddings=true",
        "model.init_std=0.15", "model.rope_theta=2000",
    ]).model
    model = Llama(cfg, rngs=nnx.Rngs(3))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rng = np.random.default_rng(1)
    params["blocks"]["attn_norm"]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, (2, 32)), jnp.float32)
    params["final_norm"]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, (32,)), jnp.float32)
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, params)
    model = nnx.merge(graphdef, state)

    hf.save(cfg, params, tmp_path, max_shard_size=20_000)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path).float().eval()
    assert theirs.config.tie_word_embeddings and theirs.config.num_key_value_heads == 2
    tokens = tokens_batch(seed=2)
    expected, expected_loss = hf_logits_and_loss(theirs, tokens)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), expected, atol=1e-4, rtol=0)
    assert llmx_loss(model, tokens) == pytest.approx(expected_loss, abs=1e-5)


@pytest.mark.parametrize(
    "field, value",
    [("rope_parameters", {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     ("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"), ("model_type", "qwen2"),
     ("head_dim", 16)],
)
def test_unsupported_options_are_one_line_errors_naming_the_field(hf_model, tmp_path, field, value):
    _, single, _ = hf_model
    raw = json.loads((single / "config.json").read_text())
    raw[field] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    shutil.copy(single / "model.safetensors", tmp_path)
    with pytest.raises(ConfigError) as err:
        hf.load(tmp_path)
    message = str(err.value)
    assert "\n" not in message and field.split("_")[0] in message


def test_missing_tensor_is_a_one_line_error_at_the_entry_point(hf_model, tmp_path, capsys):
    _, _, sharded = hf_model
    shutil.copytree(sharded, tmp_path / "broken")
    index = json.loads((tmp_path / "broken" / "model.safetensors.index.json").read_text())
    (tmp_path / "broken" / index["weight_map"]["lm_head.weight"]).unlink()
    status = run_cli(lambda: hf.main(["import", "--hf-dir", str(tmp_path / "broken"), "--out", str(tmp_path / "r")]))
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.slow
def test_imported_run_fine_tunes_generates_and_exports_back(hf_model, tmp_path, data_dir):
    """`llmx.hf import` writes a run the trainer resumes from step 0 (its first eval is the HF model's),
    that generates, and that exports back to the same tensors. In fp16, so the imported state must
    carry the loss scaler's state too."""
    from llmx.run import restore_run
    from llmx.generate import generate
    from llmx.train import train

    _, single, _ = hf_model
    run_dir = tmp_path / "run"
    run_settings = [o for o in SMALL if not o.startswith("model.")] + [f"data.cache_dir={data_dir}"]
    status = run_cli(lambda: hf.main(["import", "--hf-dir", str(single), "--out", str(run_dir), *run_settings,
                                      "train.steps=2", "train.eval_every=1", "model.seq_len=32", "train.precision=fp16",
                                      "model.dtype=auto"]))
    assert status == 0 and (run_dir / "config.yaml").is_file()

    run = restore_run(run_dir=str(run_dir), single_device=True)
    assert run.step == 0
    out = generate(run.params, run.steps.graphdef, [[1, 40, 41], [1, 42]], max_new_tokens=4,
                   max_len=32, eos_id=None)
    assert [len(o) for o in out] == [4, 4]

    cfg = config_lib.load(run_dir / "config.yaml")
    summary = train(cfg)
    assert summary.start_step == 0 and summary.final_step == 2
    assert set(summary.eval_losses) == {0, 1, 2}
    assert "loss_scale" in [m for m in read_metrics(run_dir) if "loss" in m][-1]

    hf.main(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "back"),
             "--checkpoint", str(run_dir / "checkpoints" / "0")])
    original, back = hf.read_tensors(single), hf.read_tensors(tmp_path / "back")
    assert set(original) == set(back)
    for name in original:
        np.testing.assert_array_equal(original[name], back[name], err_msg=name)
