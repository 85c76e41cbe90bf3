"""Text sampling from a trained model.

This is the trunk's sampler: each new token re-runs the model over a fixed (1, seq_len) window, so one
compiled function serves every step. Temperature and top-k as in GPT-2's sampler.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnames=("graphdef", "top_k"))
def _next_token(params, tokens, length, key, temperature, *, graphdef, top_k: int):
    model = nnx.merge(graphdef, params)
    logits = model(tokens)[0, length - 1]  # (V,) at the last filled position
    logits = logits / jnp.maximum(temperature, 1e-6)
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    greedy = jnp.argmax(logits)
    sampled = jax.random.categorical(key, logits)
    return jnp.where(temperature > 0, sampled, greedy)


def sample_text(
    params,
    graphdef,
    tokenizer,
    prompt: str,
    *,
    seq_len: int,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
) -> str:
    """The prompt's continuation (without the prompt), stopping at EOS or when the window is full."""
    ids = tokenizer.encode(prompt, add_eos=False)[:seq_len]
    tokens = np.full((1, seq_len), tokenizer.pad_id, np.int32)
    tokens[0, : len(ids)] = ids
    tokens = jnp.asarray(tokens)
    key = jax.random.key(seed)
    length = len(ids)
    new = []
    while len(new) < max_new_tokens and length < seq_len:
        key, sub = jax.random.split(key)
        token = int(_next_token(params, tokens, length, sub, temperature, graphdef=graphdef, top_k=top_k))
        if token == tokenizer.eos_id:
            break
        tokens = tokens.at[0, length].set(token)
        new.append(token)
        length += 1
    return tokenizer.decode(new)
