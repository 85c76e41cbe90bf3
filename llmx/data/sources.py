"""Text corpora as random-access data sources.

`data.source` names one corpus or a weighted mixture, `"A@3,B@1"`. A corpus is
- `stdlib`: the running interpreter's standard-library sources (real text on every machine: the first
  command needs no download);
- a directory or a glob of text files (`.txt`, `.py`, `.md`, and `.jsonl` with a text field), which
  `TextCorpus` (a TFDS `GeneratorBasedBuilder`) cleans and writes once to array_record, split into
  train/validation by content hash, keyed by a fingerprint of the files and the settings;
- `tfds:NAME` (e.g. `tfds:lm1b`, `tfds:c4/en`): a TFDS dataset already prepared in `data.tfds_data_dir`,
  read through `tfds.data_source` (array_record; `as_dataset()` would need TensorFlow).
Records are dicts with a text field; `document_text` reads it.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import sysconfig
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from llmx.cli import absl_errors_only
from llmx.errors import DataError

log = logging.getLogger(__name__)

_BUILDER_VERSION = "1.1.0"
TEXT_SUFFIXES = (".txt", ".py", ".md", ".jsonl")


@dataclasses.dataclass(frozen=True)
class Cleaning:
    validation_percent: float
    min_chars: int = 0
    dedup: bool = False
    text_field: str = "text"


def stdlib_files() -> list[Path]:
    """The standard library's `.py` files, without its test suites and third-party packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in skip]  # prune before descending
        files.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(files)


def is_validation(text: str, validation_percent: float) -> bool:
    """Held-out membership by content hash: stable across runs, machines and file orders."""
    bucket = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "little") % 10_000
    return bucket < round(validation_percent * 100)


def clean_text(raw: bytes) -> str | None:
    """Decoded text with normalised line endings, or None for binary, undecodable or empty files."""
    if b"\x00" in raw:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.strip() else None


_NO_FIELD = object()  # a .jsonl line that is a JSON object without the text field


def _jsonl_value(line: bytes, text_field: str):
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    return record.get(text_field, _NO_FIELD)


def read_documents(path: Path, text_field: str, stats: CorpusStats | None = None):
    """(key, cleaned text or None) for each document of a file: one per `.jsonl` line, else the file.
    `stats.missing_field` counts .jsonl objects without `text_field`."""
    raw = path.read_bytes()
    if path.suffix != ".jsonl":
        yield str(path), clean_text(raw)
        return
    for line_no, line in enumerate(raw.splitlines()):
        value = _jsonl_value(line, text_field)
        if value is _NO_FIELD and stats is not None:
            stats.missing_field += 1
        text = clean_text(value.encode("utf-8")) if isinstance(value, str) else None
        yield f"{path}:{line_no}", text


@dataclasses.dataclass
class CorpusStats:
    documents: dict = dataclasses.field(default_factory=dict)  # split -> count
    bytes: int = 0
    dropped: int = 0  # empty, binary, undecodable, too short
    duplicates: int = 0
    missing_field: int = 0  # .jsonl objects without data.text_field (also counted in dropped)


class TextCorpus(tfds.core.GeneratorBasedBuilder):
    """TFDS builder over a fixed list of text files, split into train/validation by content hash."""

    VERSION = tfds.core.Version(_BUILDER_VERSION)

    def __init__(self, *, files: list[Path], cleaning: Cleaning, **kwargs):
        self._files = list(files)
        self._cleaning = cleaning
        self.stats = CorpusStats()
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features, description=self.__doc__)

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        c = self._cleaning
        splits = {"train": [], "validation": []}
        seen: set[bytes] = set()
        for path in self._files:
            for key, text in read_documents(Path(path), c.text_field, self.stats):
                if text is None or len(text) < c.min_chars:
                    self.stats.dropped += 1
                    continue
                if c.dedup:
                    digest = hashlib.sha1(text.encode("utf-8")).digest()
                    if digest in seen:
                        self.stats.duplicates += 1
                        continue
                    seen.add(digest)
                splits["validation" if is_validation(text, c.validation_percent) else "train"].append(key)
        if not splits["train"] and not splits["validation"]:
            missing = self.stats.missing_field
            why = (f"{missing} .jsonl records have no field {c.text_field!r}: set data.text_field to the field that "
                   "holds the text" if missing else f"{self.stats.dropped} empty, binary, undecodable or too short")
            raise DataError(f"none of the {len(self._files)} files holds usable text documents ({why})")
        # TFDS refuses empty splits: a corpus too small for a held-out part has only `train`.
        return {name: self._generate_examples(name, set(keys)) for name, keys in splits.items() if keys}

    def _generate_examples(self, split: str, keys: set[str]):
        for path in self._files:
            for key, text in read_documents(Path(path), self._cleaning.text_field):
                if key in keys:
                    self.stats.documents[split] = self.stats.documents.get(split, 0) + 1
                    self.stats.bytes += len(text.encode("utf-8"))
                    yield key, {"text": text, "path": key}


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLMX_DATA_DIR", Path.home() / ".cache" / "llmx" / "data"))


def _fingerprint(files: list[Path], cleaning: Cleaning) -> str:
    h = hashlib.sha1(f"{_BUILDER_VERSION}:{dataclasses.astuple(cleaning)}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def resolve_files(source: str, *, max_documents: int = 0) -> list[Path]:
    """The files of a corpus: 'stdlib', a directory (its text files, recursively) or a glob."""
    if source == "stdlib":
        files = stdlib_files()
    elif Path(source).expanduser().is_dir():
        root = Path(source).expanduser()
        candidates = sorted(p for p in root.rglob("*") if p.is_file())
        if not candidates:
            raise DataError(f"data.source={source!r} holds no files; point it at a directory of text files")
        files = [p for p in candidates if p.suffix in TEXT_SUFFIXES]
        if not files:
            raise DataError(
                f"data.source={source!r} holds {len(candidates)} files but none of type {', '.join(TEXT_SUFFIXES)}"
            )
    elif any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data.source={source!r} matches no files")
    else:
        raise DataError(
            f"data.source={source!r} is not 'stdlib', 'tfds:NAME', an existing directory or a glob of text files"
        )
    return files[:max_documents] if max_documents else files


def text_corpus(source: str, *, cache_dir: str = "", cleaning: Cleaning, max_documents: int = 0) -> dict:
    """Builds (once) and returns a text corpus's splits: `train`, and `validation` unless it is too small."""
    files = resolve_files(source, max_documents=max_documents)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    data_dir = root / f"textcorpus-{_fingerprint(files, cleaning)}"
    with absl_errors_only():  # TFDS warns "Variant folder ... has no dataset_info.json" before every first build
        builder = TextCorpus(files=files, cleaning=cleaning, data_dir=str(data_dir), file_format="array_record")
        prepared = builder.is_prepared()
    stats_file = data_dir / "stats.json"
    if not prepared:
        log.info("preparing %d files of %r into %s", len(files), source, data_dir)
        builder.download_and_prepare()
        s = builder.stats
        log.info(
            "prepared %s documents (%.1f MB); dropped %d empty, binary or short, %d duplicates",
            ", ".join(f"{n} {split}" for split, n in s.documents.items()), s.bytes / 1e6, s.dropped, s.duplicates,
        )
        stats_file.write_text(json.dumps(dataclasses.asdict(s) | {"files": len(files)}))
    sources = builder.as_data_source()
    if "train" not in sources:
        raise DataError(f"data.source={source!r} is too small: every usable document fell in the validation split")
    return dict(sources)


def corpus_stats(source: str, *, cache_dir: str = "", cleaning: Cleaning, max_documents: int = 0) -> dict:
    """What preparing a text corpus recorded: files, documents per split, bytes, dropped, duplicates."""
    files = resolve_files(source, max_documents=max_documents)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    stats_file = root / f"textcorpus-{_fingerprint(files, cleaning)}" / "stats.json"
    return json.loads(stats_file.read_text()) if stats_file.is_file() else {}


def tfds_corpus(name: str, *, data_dir: str, eval_split: str) -> dict:
    """A TFDS dataset prepared elsewhere (no download here): its `train` and `eval_split` splits."""
    where = data_dir or str(tfds.core.constants.DATA_DIR)
    try:
        train, held_out = tfds.data_source(name, split=["train", eval_split], data_dir=data_dir or None, download=False)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"data.source='tfds:{name}': TFDS has no dataset named {name!r}") from None
    except Exception as e:  # TFDS signals "not prepared" or "no such split" with assorted exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(
            f"data.source='tfds:{name}' (splits train, {eval_split}) cannot be read from data.tfds_data_dir={where!r}: "
            f"{first} -- prepare it there first: tfds build {name} --file_format=array_record"
        ) from None
    return {"train": train, "validation": held_out}


def document_text(record, text_field: str = "text") -> str:
    if text_field not in record:
        raise DataError(f"records have no field {text_field!r} (data.text_field); fields: {', '.join(record)}")
    text = record[text_field]
    return text.decode("utf-8") if isinstance(text, (bytes, np.bytes_)) else str(text)


def parse_mixture(source: str) -> list[tuple[str, float]]:
    """'A@3,B@1' -> [('A', 0.75), ('B', 0.25)]; a single source has weight 1."""
    entries = []
    for part in source.split(","):
        name, _, weight = part.strip().rpartition("@") if "@" in part else (part.strip(), "", "1")
        try:
            w = float(weight)
        except ValueError:
            raise DataError(f"data.source entry {part!r}: weight {weight!r} is not a number (use SOURCE@WEIGHT)") from None
        if not name or w <= 0:
            raise DataError(f"data.source entry {part!r} needs a source and a positive weight (SOURCE@WEIGHT)")
        entries.append((name, w))
    total = sum(w for _, w in entries)
    return [(name, w / total) for name, w in entries]
