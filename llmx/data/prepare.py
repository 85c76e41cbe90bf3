"""From `DataConfig` to what training and evaluation read: the tokenizer, the weighted training
sources, and the named evaluation sets. Training, `llmx.evaluate` and `python -m llmx.data prepare`
all go through `prepare_data`, so what was prepared ahead of time is what training uses."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from llmx.config import Config
from llmx.data import sources as sources_lib
from llmx.data.tokenizer import build_tokenizer, check_tokenizer
from llmx.errors import DataError


@dataclasses.dataclass
class PreparedData:
    tokenizer: object
    train: list[tuple[object, float]]  # (random-access source, mixture weight)
    eval_sets: dict[str, object]  # name -> random-access source; "validation" first
    text_field: str


def _corpus(source: str, cfg: Config, *, validation_percent: float) -> dict:
    d = cfg.data
    if source.startswith("tfds:"):
        return sources_lib.tfds_corpus(source[5:], data_dir=d.tfds_data_dir, eval_split=d.eval_split)
    cleaning = sources_lib.Cleaning(
        validation_percent=validation_percent, min_chars=d.min_chars, dedup=d.dedup, text_field=d.text_field
    )
    return sources_lib.text_corpus(source, cache_dir=d.cache_dir, cleaning=cleaning, max_documents=d.max_documents)


def _named_sources(spec: str) -> dict[str, str]:
    named = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, source = part.partition("=")
        if not sep or not name or not source:
            raise DataError(f"data.eval_sources entry {part!r} is not NAME=SOURCE")
        named[name] = source
    return named


def check_sources(cfg: Config) -> None:
    """The quick part of `prepare_data`: every text source lists some files and the tokenizer file
    exists, so a typo is one line before anything slow (preparing a corpus can take minutes)."""
    d = cfg.data
    names = [name for name, _ in sources_lib.parse_mixture(d.source)] + list(_named_sources(d.eval_sources).values())
    for name in names:
        if not name.startswith("tfds:"):
            sources_lib.resolve_files(name, max_documents=d.max_documents)
    check_tokenizer(d)


def prepare_data(cfg: Config, *, run_dir: Path | None = None) -> PreparedData:
    check_sources(cfg)
    d = cfg.data
    mixture = sources_lib.parse_mixture(d.source)
    corpora = {name: _corpus(name, cfg, validation_percent=d.validation_percent) for name, _ in mixture}
    train = [(corpora[name]["train"], weight) for name, weight in mixture]
    eval_sets = {}
    held_out = [corpora[name]["validation"] for name, _ in mixture if "validation" in corpora[name]]
    if held_out:
        eval_sets["validation"] = held_out[0] if len(held_out) == 1 else _concatenated(held_out)
    for name, source in _named_sources(d.eval_sources).items():
        corpus = _corpus(source, cfg, validation_percent=0.0)  # an eval-only corpus: every document
        eval_sets[name] = corpus["train"]

    def corpus_texts():
        for source, _ in train:
            for i in range(len(source)):
                yield sources_lib.document_text(source[i], d.text_field)

    cache_key = hashlib.sha1(f"{d.source}:{d.max_documents}:{d.min_chars}:{d.dedup}".encode()).hexdigest()[:12]
    cache_dir = Path(d.cache_dir).expanduser() if d.cache_dir else sources_lib.default_cache_dir()
    tokenizer = build_tokenizer(
        d, vocab_size=cfg.model.vocab_size, corpus_texts=corpus_texts, cache_key=cache_key,
        cache_dir=cache_dir / "tokenizers", run_dir=run_dir,
    )
    return PreparedData(tokenizer=tokenizer, train=train, eval_sets=eval_sets, text_field=d.text_field)


def _concatenated(parts: list):
    import grain

    return grain.MapDataset.concatenate([grain.MapDataset.source(p) for p in parts])
