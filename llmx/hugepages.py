"""Transparent huge pages for XLA:CPU's buffers, by re-executing the entry point once with glibc's
`glibc.malloc.hugetlb=1` tunable.

Why by hand: XLA:CPU allocates each step's temporaries (hundreds of MiB for a small Llama) with
malloc, which glibc serves with a fresh mmap and returns to the kernel when the step ends. Every step
then faults in every page again, 4 KiB at a time: on the 2-core benchmark machine a fifth of the step
was kernel time (sys 236 ms of a 638 ms step). Where the kernel's THP mode is `madvise` (the common
default), `glibc.malloc.hugetlb=1` makes malloc ask for 2 MiB pages, 512x fewer faults: the same step
took 502 ms with sys 58 ms (`python scripts/bench_train.py` measures it). glibc reads tunables only at
process start, so the only way in from Python is `execve` with the variable set, before jax is
imported; the process keeps its pid and arguments.

`LLMX_HUGEPAGES=0` turns it off. It is skipped where it cannot help: not Linux/glibc >= 2.35, THP
`always` (already huge) or `never`, or a GLIBC_TUNABLES that already sets `glibc.malloc.hugetlb`.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
# The `python -m` entry points that run XLA:CPU steps (the package is imported before their code runs).
ENTRY_POINTS = ("llmx.train", "llmx.evaluate", "llmx.generate")


def _glibc_at_least(major: int, minor: int) -> bool:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        have = tuple(int(p) for p in version.split(".")[:2])
    except (ValueError, OSError, AttributeError):
        return False
    return name == "glibc" and have >= (major, minor)


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (`always`, `madvise`, `never`), None if unknown."""
    try:
        text = open(THP_MODE).read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def wanted() -> bool:
    """Whether re-executing with the tunable would change anything here."""
    if os.environ.get("LLMX_HUGEPAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return thp_mode() == "madvise" and _glibc_at_least(2, 35)


def environment() -> dict[str, str]:
    """os.environ plus the tunable (appended to any GLIBC_TUNABLES the user set)."""
    env = dict(os.environ)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    env["GLIBC_TUNABLES"] = ":".join([*tunables, f"{TUNABLE}=1"])
    return env


def reexec() -> None:
    """Replaces this process by itself with huge pages on, if that helps here; returns otherwise."""
    if not wanted() or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environment())


def reexec_entry_point() -> None:
    """Called while `python -m llmx.<entry>` imports the llmx package, before the entry's own imports
    (runpy sets sys.argv[0] to '-m' during that import): re-executes for the entry points above only."""
    argv = getattr(sys, "orig_argv", [])
    if sys.argv[:1] != ["-m"] or "-m" not in argv:
        return
    module = argv[argv.index("-m") + 1] if argv.index("-m") + 1 < len(argv) else ""
    if module in ENTRY_POINTS:
        reexec()
