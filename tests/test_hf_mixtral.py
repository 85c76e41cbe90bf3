"""Hugging Face interop of the mixtral family: logits parity with transformers' MixtralForCausalLM after
import (the hub layout it saves, and the merged gate_up_proj layout it holds in memory) and after export."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmx import config as config_lib
from llmx import hf
from llmx.models.mixtral import Mixtral

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB, T = 96, 12


def _logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """A small GQA Mixtral (4 experts, top-2), random weights and norms, fp32, saved by transformers."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.2, rope_theta=500.0,
    )
    model = transformers.MixtralForCausalLM(config).float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
    hub = tmp_path_factory.mktemp("mixtral") / "hub"
    model.save_pretrained(hub)
    return model, hub


def test_import_matches_transformers_logits(hf_model, tmp_path):
    model, hub = hf_model
    tokens = np.random.default_rng(0).integers(0, VOCAB, (3, T)).astype(np.int32)
    expected = _logits(model, tokens)
    assert np.abs(expected).max() > 0.5
    from safetensors.numpy import load_file
    assert any("block_sparse_moe.experts.0.w1" in name for name in load_file(hub / "model.safetensors"))
    cfg, ours = hf.load(hub)
    assert (cfg.family, cfg.n_experts, cfg.experts_per_token, cfg.expert_d_ff, cfg.n_kv_heads) == ("mixtral", 4, 2, 40, 2)
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(tokens))), expected, atol=1e-4, rtol=0)
    # the merged layout transformers >= 5 holds in memory (mlp.experts.gate_up_proj, mlp.gate)
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text((hub / "config.json").read_text())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    safetensors_torch.save_file(state, merged / "model.safetensors", metadata={"format": "pt"})
    _, ours_merged = hf.load(merged)
    np.testing.assert_allclose(np.asarray(ours_merged(jnp.asarray(tokens))), expected, atol=1e-4, rtol=0)


def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
    cfg = config_lib.load(None, [
        "model.family=mixtral", f"model.vocab_size={VOCAB}", "model.d_model=32", "model.n_layers=2",
        "model.n_heads=4", "model.n_kv_heads=2", "model.moe_d_ff=24", "model.n_experts=4",
        "model.experts_per_token=2", "model.seq_len=64", "model.init_std=0.2",
    ]).model
    model = Mixtral(cfg, rngs=nnx.Rngs(3))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    hf.save(cfg, params, tmp_path)
    theirs = transformers.MixtralForCausalLM.from_pretrained(tmp_path).float().eval()
    assert theirs.config.num_local_experts == 4 and theirs.config.intermediate_size == 24
    tokens = np.random.default_rng(2).integers(0, VOCAB, (2, T)).astype(np.int32)
    expected = _logits(theirs, tokens)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), expected, atol=1e-4, rtol=0)
