"""`python -m llmx.generate --run-dir R --prompt "..."`: batched sampling with a KV cache.

Prompts are LEFT-padded to the longest one, so every row's last prompt token sits in the same column
and each decode step writes one cache slot shared by the whole batch; padding slots carry segment id
0 and are never attended to, and positions count from each row's first real token. One jitted call
prefills the whole prompt batch into a cache preallocated to its final length, then one jitted call
per new token decodes; shapes never change between steps, so nothing recompiles. Sampling:
temperature (0: greedy), top-k and nucleus top-p (Holtzman et al. 2020), all traced values.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmx import mesh as mesh_lib
from llmx.cli import run as run_cli
from llmx.errors import ConfigError
from llmx.run import restore_run


def sample_logits(logits, key, *, temperature, top_k, top_p):
    """Next tokens (B,) from logits (B, V): greedy when temperature is 0, else sampled from the
    temperature-scaled distribution restricted to the top-k (0: all) and the top-p probability mass."""
    V = logits.shape[-1]
    scaled = logits / jnp.maximum(temperature, 1e-6)
    ranked = jnp.sort(scaled, axis=-1)[:, ::-1]  # (B, V) descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(ranked, jnp.broadcast_to(k - 1, (ranked.shape[0], 1)), axis=-1)  # (B, 1)
    probs = jax.nn.softmax(ranked, axis=-1)
    # Keep a ranked token while the mass before it is under top_p (so the top token always stays).
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # (B, V)
    n_nucleus = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)  # (B, 1)
    pth = jnp.take_along_axis(ranked, n_nucleus - 1, axis=-1)  # (B, 1)
    threshold = jnp.maximum(kth, pth)
    sampled = jax.random.categorical(key, jnp.where(scaled < threshold, -jnp.inf, scaled), axis=-1)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"))
def _prefill(params, tokens, segment_ids, positions, key, sampling, *, graphdef, max_len: int):
    """Fills a fresh cache with the prompt batch (B, P); -> (first new tokens (B,), cache)."""
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(tokens.shape[0], max_len)
    logits, cache = model.decode(tokens, cache, segment_ids=segment_ids, positions=positions, index=0)
    return sample_logits(logits[:, -1], key, **sampling), cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _decode_step(params, cache, tokens, positions, index, key, sampling, *, graphdef):
    """One token per row (B,) at cache slot `index`; -> (next tokens (B,), cache)."""
    model = nnx.merge(graphdef, params)
    ones = jnp.ones_like(tokens)[:, None]  # (B, 1): generated tokens belong to their row's prompt
    logits, cache = model.decode(tokens[:, None], cache, segment_ids=ones, positions=positions[:, None], index=index)
    return sample_logits(logits[:, -1], key, **sampling), cache


def left_pad(prompts: Sequence[Sequence[int]], *, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, segment_ids, positions), each (B, P), for prompts left-padded to the longest, P."""
    lengths = np.array([len(p) for p in prompts])
    if not len(prompts) or lengths.min() < 1:
        raise ConfigError("every prompt needs at least one token (the tokenizer's BOS counts)")
    P = int(lengths.max())
    pad = P - lengths[:, None]  # (B, 1)
    cols = np.arange(P)[None, :]  # (1, P)
    tokens = np.full((len(prompts), P), pad_id, np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, P - len(ids):] = ids
    segment_ids = (cols >= pad).astype(np.int32)
    positions = np.maximum(cols - pad, 0).astype(np.int32)
    return tokens, segment_ids, positions


def generate(
    params,
    graphdef,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    max_len: int,
    eos_id: int | None,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    mesh=None,
    on_tokens: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> list[list[int]]:
    """New token ids per prompt (EOS not included), at most `max_new_tokens` and at most `max_len`
    tokens of prompt plus continuation. `mesh` (the training mesh, params placed on it) constrains
    activations and the cache by the logical-axis rules. `on_tokens(tokens (B,), finished (B,))` is
    called after every step (streaming)."""
    tokens, segment_ids, positions = left_pad(prompts, pad_id=pad_id)
    B, P = tokens.shape
    if P >= max_len:
        raise ConfigError(f"the longest prompt has {P} tokens; the model's context is {max_len} (model.seq_len)")
    steps = min(max_new_tokens, max_len - P)
    if steps < 1:
        return [[] for _ in prompts]
    sampling = {
        "temperature": jnp.float32(temperature), "top_k": jnp.int32(top_k), "top_p": jnp.float32(top_p),
    }
    key = jax.random.key(seed)
    lengths = positions[:, -1] + 1  # (B,) real prompt tokens per row
    context = mesh_lib.activation_sharding(mesh) if mesh is not None else contextlib.nullcontext()
    new = np.zeros((B, steps), np.int32)
    finished = np.zeros(B, bool)
    with context:
        token, cache = _prefill(
            params, tokens, segment_ids, positions, jax.random.fold_in(key, 0), sampling,
            graphdef=graphdef, max_len=P + steps,
        )
        for n in range(steps):
            new[:, n] = np.asarray(token)
            finished_before = finished.copy()
            if eos_id is not None:
                finished |= new[:, n] == eos_id
            if on_tokens is not None:
                on_tokens(new[:, n], finished_before)
            if finished.all() or n == steps - 1:
                break
            token, cache = _decode_step(
                params, cache, token, jnp.asarray(lengths + n, jnp.int32), jnp.int32(P + n),
                jax.random.fold_in(key, n + 1), sampling, graphdef=graphdef,
            )
    out = []
    for row in new[:, : n + 1].tolist():
        out.append(row[: row.index(eos_id)] if eos_id in row else row)
    return out


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
    top_p: float = 1.0,
    seed: int = 0,
    mesh=None,
) -> str:
    """The prompt's continuation (without the prompt), stopping at EOS or when the context is full."""
    ids = tokenizer.encode(prompt, add_eos=False)[: seq_len - 1]
    (new,) = generate(
        params, graphdef, [ids], max_new_tokens=max_new_tokens, max_len=seq_len, eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, mesh=mesh,
    )
    return tokenizer.decode(new)


class TextStream:
    """Prints one row's new tokens as they come, holding back a partial multi-byte character."""

    def __init__(self, tokenizer, out=sys.stdout):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, tokens: np.ndarray, finished: np.ndarray) -> None:
        if finished[0] or tokens[0] == self.tokenizer.eos_id:
            return
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids)
        stable = len(text) - 1 if text.endswith("\ufffd") else len(text)
        self.out.write(text[self.printed : stable])
        self.out.flush()
        self.printed = max(self.printed, stable)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmx.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="a training run directory (config.yaml, checkpoints/)")
    parser.add_argument("--checkpoint", help="a checkpoint directory (default: the newest in RUN_DIR/checkpoints)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one prompt")
    group.add_argument("--prompt-file", help="a file with one prompt per line, decoded as one batch")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=40, help="0: no top-k cut")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass kept (1: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--single-device", action="store_true", help="one device instead of the training mesh")
    parser.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = parser.parse_args(argv)
    run = restore_run(run_dir=args.run_dir, overrides=args.overrides, checkpoint=args.checkpoint,
                      single_device=args.single_device)
    tokenizer = run.tokenizer
    if args.prompt is not None:
        texts = [args.prompt]
    else:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ConfigError(f"--prompt-file {path} does not exist")
        texts = [line for line in path.read_text().splitlines() if line.strip()]
    prompts = [tokenizer.encode(t, add_eos=False) for t in texts]
    stream = len(texts) == 1
    if stream:
        sys.stdout.write(texts[0])
    new = generate(
        run.params, run.steps.graphdef, prompts, max_new_tokens=args.max_new_tokens, max_len=run.cfg.model.seq_len,
        eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, mesh=run.steps.mesh, on_tokens=TextStream(tokenizer) if stream else None,
    )
    if stream:
        sys.stdout.write("\n")
    else:
        for text, ids in zip(texts, new):
            print(text + tokenizer.decode(ids))
            print("-" * 40)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
