"""Text corpora as TFDS datasets in array_record, read back as random-access data sources.

A corpus is a list of text files. `TextCorpus` (a TFDS `GeneratorBasedBuilder`) cleans them and writes
`train` and `validation` splits once; later runs reuse the prepared files, keyed by a fingerprint of
the file list and the split settings. The default corpus is the running interpreter's standard-library
sources: real text present on every machine, so the first command needs no download.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import sysconfig
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from llmx.errors import DataError

log = logging.getLogger(__name__)

_BUILDER_VERSION = "1.0.0"


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


@dataclasses.dataclass
class CorpusStats:
    documents: int = 0
    dropped: int = 0
    bytes: int = 0


class TextCorpus(tfds.core.GeneratorBasedBuilder):
    """TFDS builder over a fixed list of text files, split into train/validation by content hash."""

    VERSION = tfds.core.Version(_BUILDER_VERSION)

    def __init__(self, *, files: list[Path], validation_percent: float, **kwargs):
        self._files = list(files)
        self._validation_percent = validation_percent
        self.stats = CorpusStats()
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()})
        return tfds.core.DatasetInfo(builder=self, features=features, description=self.__doc__)

    def _split_generators(self, dl_manager):
        del dl_manager  # local files only
        splits = {"train": [], "validation": []}
        for path in self._files:
            text = clean_text(Path(path).read_bytes())
            if text is None:
                self.stats.dropped += 1
                continue
            splits["validation" if is_validation(text, self._validation_percent) else "train"].append(path)
        if not splits["train"]:
            raise DataError(
                f"none of the {len(self._files)} files holds usable text documents for training "
                f"({self.stats.dropped} empty or binary)"
            )
        # TFDS refuses empty splits: a corpus too small for a held-out part has only `train`.
        return {name: self._generate_examples(paths) for name, paths in splits.items() if paths}

    def _generate_examples(self, paths):
        for path in paths:
            text = clean_text(Path(path).read_bytes())
            self.stats.documents += 1
            self.stats.bytes += len(text.encode("utf-8"))
            yield str(path), {"text": text, "path": str(path)}


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLMX_DATA_DIR", Path.home() / ".cache" / "llmx" / "data"))


def _fingerprint(files: list[Path], validation_percent: float) -> str:
    h = hashlib.sha1(f"{_BUILDER_VERSION}:{validation_percent}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def resolve_files(source: str, *, max_documents: int = 0) -> list[Path]:
    """The files of `data.source`: 'stdlib' or a directory of text files."""
    if source == "stdlib":
        files = stdlib_files()
    else:
        root = Path(source).expanduser()
        if not root.is_dir():
            raise DataError(f"data.source={source!r} is neither 'stdlib' nor an existing directory")
        files = sorted(p for p in root.rglob("*") if p.is_file())
    if max_documents:
        files = files[:max_documents]
    if not files:
        raise DataError(f"data.source={source!r} holds no files; point it at a directory of text files")
    return files


def prepare(source: str, *, cache_dir: str = "", validation_percent: float, max_documents: int = 0):
    """Builds (once) and returns the random-access data sources: `train`, and `validation` unless the
    corpus is too small for a held-out part."""
    files = resolve_files(source, max_documents=max_documents)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    data_dir = root / f"textcorpus-{_fingerprint(files, validation_percent)}"
    builder = TextCorpus(
        files=files, validation_percent=validation_percent, data_dir=str(data_dir), file_format="array_record"
    )
    if not builder.is_prepared():
        log.info("preparing %d files of %r into %s", len(files), source, data_dir)
        builder.download_and_prepare()
        s = builder.stats
        log.info("prepared %d documents (%.1f MB); dropped %d empty or binary files", s.documents, s.bytes / 1e6, s.dropped)
    return builder.as_data_source()


def document_text(record) -> str:
    text = record["text"]
    return text.decode("utf-8") if isinstance(text, (bytes, np.bytes_)) else str(text)
