"""C++ kernels for XLA:CPU (XLA FFI handlers) shipped as source and compiled on first use.

The host's C++ compiler (`CXX`, else g++/c++/clang++) builds a source for this CPU (`-march=native`),
like PyTorch's `cpp_extension.load`: the library lands in `LLMX_CACHE_DIR` (default ~/.cache/llmx)
under a key of the source, the CPU (`cpu_identity`), the jaxlib version and the build's
flags, so a later run loads it in milliseconds. A damaged library in the cache is found by the digest
recorded beside it and rebuilt (dlopen of a truncated shared object dies with SIGBUS, not an error).
Users: `llmx.attention.cpu` (flash attention) and `llmx.weight_grad` (the projections' weight gradient).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import jax

log = logging.getLogger(__name__)


def cache_dir(kind: str) -> Path:
    return Path(os.environ.get("LLMX_CACHE_DIR", Path.home() / ".cache" / "llmx")) / kind


def compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


# The headers the sources share (`#include "cpu_pool.h"`): part of every library's key.
HEADERS = sorted(Path(__file__).parent.glob("*.h"))


def key(source: Path, *extra: str) -> str:
    """Source, shared headers, CPU and jaxlib version: what a built library depends on."""
    parts = [source.read_bytes(), *(h.read_bytes() for h in HEADERS), cpu_identity().encode(), jax.lib.__version__.encode(), *(e.encode() for e in extra)]
    return hashlib.sha256(b"|".join(parts)).hexdigest()[:16]


def cpu_identity() -> str:
    """What makes two CPUs' matmul speeds differ: model name and the SIMD/matrix extensions (VMs
    report the same host name everywhere, so the host name alone would reuse another CPU's probe)."""
    model, flags = "", ""
    try:
        for line in open("/proc/cpuinfo"):
            field, _, value = line.partition(":")
            if field.strip() == "model name" and not model:
                model = value.strip()
            elif field.strip() == "flags":
                flags = " ".join(sorted(f for f in value.split() if f.startswith(("avx", "amx", "fma"))))
                break
    except OSError:
        pass
    return f"{model or platform.processor()}|{flags}"


def best_seconds(fn, *args, repeats: int) -> float:
    """The fastest of `repeats` timed calls of `fn(*args)` (after one untimed call that compiles)."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def intact(target: Path) -> bool:
    """Whether `target` is the library a build wrote: its digest matches the one recorded beside it."""
    try:
        return target.with_suffix(".sha256").read_text().strip() == _digest(target)
    except OSError:
        return False


def build(compiler_path: str, source: Path, target: Path, flags: list[str] = (), *, what: str) -> None:
    """Compile `source` into `target`, and its digest beside it (atomically: concurrent runs each build
    into a temporary file)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler_path, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", *flags, "-isystem",
               jax.ffi.include_dir(), str(source), "-o", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode:
            log.debug("%s\n%s", " ".join(cmd), result.stderr)
            last = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "")
            raise RuntimeError(f"{Path(compiler_path).name} exited with {result.returncode} compiling {source.name}"
                               + (f": {last.strip()}" if last else ""))
        digest = Path(tmp) / "digest"
        digest.write_text(_digest(out))
        os.replace(out, target)
        os.replace(digest, target.with_suffix(".sha256"))
    log.info("compiled the %s (%s, %.1f s, once per CPU) into %s", what, Path(compiler_path).name,
             time.perf_counter() - t0, target)


def load(compiler_path: str, source: Path, target: Path, flags: list[str] = (), *, what: str) -> ctypes.CDLL:
    """The library built from `source` at `target`, built (or rebuilt, when damaged) first if needed.
    Raises OSError or RuntimeError (a failed build)."""
    if target.exists() and not intact(target):
        log.warning("the cached %s %s is damaged; rebuilding it", what, target)
    if not intact(target):
        build(compiler_path, source, target, flags, what=what)
    return ctypes.cdll.LoadLibrary(str(target))


def cached_probe(path: Path, key: str, required: set[str], measure, memo: dict, *, what: str) -> dict:
    """A kernel's timings {name: seconds}: from `memo` (this process), else from the JSON file `path`
    under `key` (a CPU, source and variant), else `measure()` run once and written back atomically (other
    keys in the file are kept). The first call may come while a model is traced, hence compile-time eval."""
    if key in memo:
        return memo[key]
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if not isinstance(cached.get(key), dict) or not required <= cached[key].keys():
        with jax.ensure_compile_time_eval():
            cached[key] = measure()
        log.info("%s probe, ms: %s", what, ", ".join(f"{k} {v * 1e3:.2f}" for k, v in cached[key].items()))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached))
        os.replace(tmp, path)
    memo[key] = cached[key]
    return cached[key]
