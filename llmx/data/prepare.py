"""From `DataConfig` to what training and evaluation read: the tokenizer, the weighted training
sources, and the named evaluation sets. Training, `llmx.evaluate` and `python -m llmx.data prepare`
all go through `prepare_data`, so what was prepared ahead of time is what training uses."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from llmx.config import Config
from llmx.data import sources as sources_lib
from llmx.data import supervised
from llmx.data.tokenizer import build_tokenizer, check_tokenizer
from llmx.errors import DataError


@dataclasses.dataclass
class PreparedData:
    tokenizer: object
    train: list[tuple[object, float]]  # (random-access source, mixture weight)
    # name -> random-access source: "validation" first (pooled over a mixture), then each mixture
    # component's own held-out part ("validation/NAME"), then data.eval_sources
    eval_sets: dict[str, object]
    text_field: str
    # data.format != text: records are already {"tokens", "weights"} (llmx.data.supervised)
    supervised: bool = False


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


def _component_name(source: str) -> str:
    """A mixture component's short name for its eval set: 'stdlib', 'lm1b', a file or directory's stem."""
    if source.startswith("tfds:"):
        return source[5:].replace("/", "_")
    return Path(source.rstrip("/").split("*")[0].rstrip("/") or source).stem or source


def _eval_sets(mixture, corpora: dict, *, extra: dict) -> dict[str, object]:
    """'validation' (pooled), then each component's held-out part when there are several (a mixture's
    eval loss is reported per component, not only pooled), then the named extra sets."""
    eval_sets = {}
    held_out = {name: corpora[name]["validation"] for name, _ in mixture if "validation" in corpora[name]}
    if held_out:
        parts = list(held_out.values())
        eval_sets["validation"] = parts[0] if len(parts) == 1 else _concatenated(parts)
    if len(mixture) > 1:
        eval_sets.update({f"validation/{_component_name(name)}": part for name, part in held_out.items()})
    return eval_sets | extra


def _tokenizer(cfg: Config, corpus_texts, *, run_dir: Path | None):
    d = cfg.data
    key = f"{d.source}:{d.max_documents}:{d.min_chars}:{d.dedup}" + (f":{d.format}" if d.format != "text" else "")
    cache_key = hashlib.sha1(key.encode()).hexdigest()[:12]
    cache_dir = Path(d.cache_dir).expanduser() if d.cache_dir else sources_lib.default_cache_dir()
    return build_tokenizer(
        d, vocab_size=cfg.model.vocab_size, corpus_texts=corpus_texts, cache_key=cache_key,
        cache_dir=cache_dir / "tokenizers", run_dir=run_dir,
    )


def check_sources(cfg: Config) -> None:
    """The quick part of `prepare_data`: every text source lists some files and the tokenizer file
    exists, so a typo is one line before anything slow (preparing a corpus can take minutes)."""
    d = cfg.data
    names = [name for name, _ in sources_lib.parse_mixture(d.source)] + list(_named_sources(d.eval_sources).values())
    for name in names:
        # A single .jsonl file is a supervised source (llmx.data.supervised.read_records reads it).
        if not name.startswith("tfds:") and not Path(name).expanduser().is_file():
            sources_lib.resolve_files(name, max_documents=d.max_documents)
    check_tokenizer(d)


def prepare_data(cfg: Config, *, run_dir: Path | None = None) -> PreparedData:
    check_sources(cfg)
    d = cfg.data
    if d.format != "text":
        return _prepare_supervised(cfg, run_dir=run_dir)
    mixture = sources_lib.parse_mixture(d.source)
    corpora = {name: _corpus(name, cfg, validation_percent=d.validation_percent) for name, _ in mixture}
    train = [(corpora[name]["train"], weight) for name, weight in mixture]
    extra = {name: _corpus(source, cfg, validation_percent=0.0)["train"]  # eval-only corpora: every document
             for name, source in _named_sources(d.eval_sources).items()}

    def corpus_texts():
        for source, _ in train:
            for i in range(len(source)):
                yield sources_lib.document_text(source[i], d.text_field)

    tokenizer = _tokenizer(cfg, corpus_texts, run_dir=run_dir)
    return PreparedData(tokenizer=tokenizer, train=train, eval_sets=_eval_sets(mixture, corpora, extra=extra),
                        text_field=d.text_field)


def _prepare_supervised(cfg: Config, *, run_dir: Path | None) -> PreparedData:
    """Supervised .jsonl records: read and checked, split by content hash (or fold), and every record
    tokenized with its loss weights now, so a bad record stops the run before training starts."""
    d = cfg.data
    formatter = supervised.Formatter(d)
    mixture = sources_lib.parse_mixture(d.source)

    def read(source, *, split: bool):
        records = supervised.read_records(source, fields=formatter.fields(), max_documents=d.max_documents)
        if not split:
            return {"train": records}
        return supervised.split_records(records, validation_percent=d.validation_percent, folds=d.folds, fold=d.fold)

    corpora = {name: read(name, split=True) for name, _ in mixture}
    extra = {name: read(source, split=False)["train"] for name, source in _named_sources(d.eval_sources).items()}

    def corpus_texts():
        for name, _ in mixture:
            yield from (formatter.text(r) for r in corpora[name]["train"])

    tokenizer = _tokenizer(cfg, corpus_texts, run_dir=run_dir)
    formatter = supervised.Formatter(d, tokenizer)
    encode = lambda records: supervised.encode_all(formatter, records, max_tokens=cfg.model.seq_len + 1)  # noqa: E731
    corpora = {name: {split: encode(records) for split, records in parts.items()} for name, parts in corpora.items()}
    train = [(corpora[name]["train"], weight) for name, weight in mixture]
    extra = {name: encode(records) for name, records in extra.items()}
    return PreparedData(tokenizer=tokenizer, train=train, eval_sets=_eval_sets(mixture, corpora, extra=extra),
                        text_field=d.text_field, supervised=True)


def _concatenated(parts: list):
    import grain

    return grain.MapDataset.concatenate([grain.MapDataset.source(p) for p in parts])
