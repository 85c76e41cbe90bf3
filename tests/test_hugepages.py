"""`python -m llmx.train` re-executes itself once with glibc's huge-page tunable (llmx/hugepages.py)."""

import os
import subprocess
import sys

from llmx import hugepages

SHOW = "import os, llmx.hugepages as h; h.reexec(); print('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''))"


def _run(code: str, **env) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LLMX_HUGEPAGES")}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_environment_appends_to_user_tunables(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert hugepages.environment()["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert hugepages.environment()["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_reexec_sets_the_tunable_once_where_it_helps(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("LLMX_HUGEPAGES", raising=False)
    expected = "glibc.malloc.hugetlb=1" if hugepages.wanted() else ""
    # Exactly one line: the re-executed process printed it, the first one never got there.
    assert _run(SHOW) == f"TUNABLES={expected}"
    assert _run(SHOW, LLMX_HUGEPAGES="0") == "TUNABLES="
    # A user's own setting is kept as it is.
    assert _run(SHOW, GLIBC_TUNABLES="glibc.malloc.hugetlb=0") == "TUNABLES=glibc.malloc.hugetlb=0"


def test_plain_import_does_not_reexec():
    assert _run("import os, llmx; print('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''))") == "TUNABLES="
