"""Writes the project's own small tasks under configs/tasks/ (deterministic: seeded, and the stdlib-based
ones read this interpreter's standard library). The files are committed; rerun to regenerate.

    python scripts/make_tasks.py

- upper/: upper-casing a random 5-letter lowercase word, generation with exact match (`llmx_upper`), and
  its training records for supervised fine-tuning (`configs/sft_tiny.yaml`); no test word in the training
  set. One fixed length, so every answer letter sits at the same distance from its source letter: the
  tiny model learns this copy-and-map within a few hundred steps on a CPU (it did not learn reversal of
  3-6 letter words in 600: the answer's letters move by a word-length-dependent distance).
- reverse/: string reversal, generation with exact match (`llmx_reverse`), and its training records:
  lowercase words of 3-6 letters, no test word in the training set.
- add/: two-number addition (`llmx_add`), generation with exact match, with training records.
- keyword/: which standard-library module a docstring's first line comes from, of four
  (`llmx_keyword`, multiple choice), with training records.
- perplexity/: per-domain perplexity (`llmx_ppl_code`, `llmx_ppl_docs`; tag `llmx_perplexity`): standard
  library function sources and docstrings.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "configs" / "tasks"
KEYWORD_MODULES = ("math", "os", "json", "re", "string", "random", "itertools", "shutil")


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def reverse_task(rng: random.Random) -> None:
    words = set()
    while len(words) < 6000:
        words.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6))))
    words = sorted(words)
    rng.shuffle(words)
    record = lambda w: {"prompt": f"reverse {w} =", "completion": f" {w[::-1]}"}  # noqa: E731
    write_jsonl(ROOT / "reverse" / "test.jsonl", [record(w) for w in words[:200]])
    write_jsonl(ROOT / "reverse" / "train.jsonl", [record(w) for w in words[200:]])


def upper_task(rng: random.Random) -> None:
    words = set()
    while len(words) < 6000:
        words.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5)))
    words = sorted(words)
    rng.shuffle(words)
    record = lambda w: {"prompt": f"upper {w} =", "completion": f" {w.upper()}"}  # noqa: E731
    write_jsonl(ROOT / "upper" / "test.jsonl", [record(w) for w in words[:200]])
    write_jsonl(ROOT / "upper" / "train.jsonl", [record(w) for w in words[200:]])


def add_task(rng: random.Random) -> None:
    pairs = sorted({(rng.randint(0, 99), rng.randint(0, 99)) for _ in range(20000)})
    rng.shuffle(pairs)
    record = lambda a, b: {"prompt": f"{a}+{b}=", "completion": f"{a + b}"}  # noqa: E731
    write_jsonl(ROOT / "add" / "test.jsonl", [record(*p) for p in pairs[:200]])
    write_jsonl(ROOT / "add" / "train.jsonl", [record(*p) for p in pairs[200:]])


def _docstrings(module) -> list[str]:
    lines = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or not callable(obj):
            continue
        doc = inspect.getdoc(obj)
        first = doc.strip().splitlines()[0].strip() if doc else ""
        if 15 <= len(first) <= 100:
            lines.append(first)
    return sorted(set(lines))


def keyword_task(rng: random.Random) -> None:
    items = []
    for module_name in KEYWORD_MODULES:
        items += [(line, module_name) for line in _docstrings(importlib.import_module(module_name))]
    rng.shuffle(items)
    records = []
    for line, answer in items:
        choices = rng.sample([m for m in KEYWORD_MODULES if m != answer], 3) + [answer]
        rng.shuffle(choices)
        records.append({"text": line, "choices": choices, "label": choices.index(answer),
                        "prompt": f"{line}\nmodule:", "completion": f" {answer}"})
    cut = len(records) // 4
    write_jsonl(ROOT / "keyword" / "test.jsonl", records[:cut])
    write_jsonl(ROOT / "keyword" / "train.jsonl", records[cut:])


def perplexity_task(rng: random.Random) -> None:
    code, docs = [], []
    for module_name in ("textwrap", "fnmatch", "shlex", "bisect", "heapq", "colorsys"):
        module = importlib.import_module(module_name)
        for name, obj in sorted(vars(module).items()):
            if inspect.isfunction(obj) and obj.__module__ == module_name:
                source = inspect.getsource(obj)
                if len(source) <= 1500:
                    code.append({"text": source})
                if inspect.getdoc(obj):
                    docs.append({"text": inspect.getdoc(obj)})
    rng.shuffle(code)
    rng.shuffle(docs)
    write_jsonl(ROOT / "perplexity" / "code.jsonl", code[:40])
    write_jsonl(ROOT / "perplexity" / "docs.jsonl", docs[:40])


def main() -> None:
    for make in (upper_task, reverse_task, add_task, keyword_task, perplexity_task):
        make(random.Random(f"llmx-{make.__name__}"))
    for path in sorted(ROOT.rglob("*.jsonl")):
        print(f"{path.relative_to(ROOT.parent.parent)}: {sum(1 for _ in path.open())} records")


if __name__ == "__main__":
    main()
