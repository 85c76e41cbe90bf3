"""Tokenizers. Special ids are explicit: every document is encoded as BOS + text + EOS; PAD fills
positions that belong to no document (segment id 0) and never carries loss.

- `byte`: UTF-8 bytes, no file (ByT5's layout).
- `bpe`: byte-level BPE (GPT-2 style) trained with HF `tokenizers` on the training corpus, with
  `<pad>`, `<s>`, `</s>` at ids 0, 1, 2; saved as `tokenizer.json` in the run directory (and cached by
  corpus in the data directory), and reused from there on resume.
- a path to any `tokenizer.json`: loaded as is; `data.bos_token` / `data.eos_token` / `data.pad_token`
  name its special tokens (a missing pad token falls back to EOS: padding never carries loss).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmx import storage
from llmx.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes shifted past three special ids (the ByT5 layout): PAD=0, BOS=1, EOS=2, byte b -> b + 3."""

    kind = "byte"
    pad_id = 0
    bos_id = 1
    eos_id = 2
    _offset = 3
    vocab_size = 256 + _offset

    def encode(self, text: str | bytes, *, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else text
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32) + self._offset  # (len(data),)
        parts = [[self.bos_id]] * add_bos + [ids] + [[self.eos_id]] * add_eos
        return np.concatenate([np.asarray(p, np.int32) for p in parts])

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        data = bytes(int(i) - self._offset for i in ids if self._offset <= int(i) < self.vocab_size)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A HF `tokenizers` tokenizer with explicit BOS/EOS/PAD ids."""

    kind = "hf"

    def __init__(self, tokenizer: Tokenizer, *, bos_token: str, eos_token: str, pad_token: str, path: Path):
        self.tokenizer = tokenizer
        self.path = path
        ids = {name: tokenizer.token_to_id(tok) for name, tok in
               (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token))}
        for name in ("bos_token", "eos_token"):
            if ids[name] is None:
                tok = {"bos_token": bos_token, "eos_token": eos_token}[name]
                raise ConfigError(f"data.{name}={tok!r} is not in the vocabulary of {path}; name its {name[:3].upper()} token")
        self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
        self.pad_id = ids["pad_token"] if ids["pad_token"] is not None else self.eos_id
        self.vocab_size = tokenizer.get_vocab_size()

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray([self.bos_id] * add_bos + ids + [self.eos_id] * add_eos, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray([self.bos_id, *e.ids, self.eos_id], np.int32) for e in encodings]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)


def train_bpe(texts: Iterable[str], *, vocab_size: int, path: Path, length: int | None = None) -> Path:
    """Byte-level BPE on `texts`, saved to `path` (written to a temporary file, then renamed)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tokenizer.save(str(tmp))
    tmp.replace(path)
    return path


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"data.tokenizer={str(path)!r}: no such tokenizer.json")
    return path


def check_tokenizer(data_cfg) -> None:
    """The tokenizer.json that `data.tokenizer` names exists (`byte` and `bpe` need none)."""
    if data_cfg.tokenizer not in ("byte", "bpe"):
        _existing(Path(data_cfg.tokenizer).expanduser())


def _load(path: Path, data_cfg) -> HFTokenizer:
    _existing(path)
    try:  # a run's copy may be in a bucket (llmx.storage), which Tokenizer.from_file cannot open
        tokenizer = Tokenizer.from_str(path.read_text()) if storage.is_remote(path) else Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exceptions for malformed files
        raise DataError(f"data.tokenizer={str(path)!r} is not a valid tokenizer.json: {str(e).splitlines()[0]}") from None
    return HFTokenizer(tokenizer, bos_token=data_cfg.bos_token, eos_token=data_cfg.eos_token,
                       pad_token=data_cfg.pad_token, path=path)


def _copy(source: Path, target) -> None:
    """A copy of a local tokenizer.json in the run directory, local or in a bucket (llmx.storage)."""
    if storage.is_remote(target):
        target.write_bytes(Path(source).read_bytes())
    else:
        shutil.copyfile(source, target)


def build_tokenizer(data_cfg, *, vocab_size: int, corpus_texts=None, cache_key: str = "", cache_dir: Path | None = None,
                    run_dir: Path | None = None):
    """The tokenizer named by `data.tokenizer`, checked against `model.vocab_size`.

    For `bpe`, a `tokenizer.json` in the run directory wins (resume); else one cached for this corpus
    and vocabulary; else it is trained on `corpus_texts()` and cached. The run directory gets a copy.
    """
    kind = data_cfg.tokenizer
    if kind == "byte":
        tok = ByteTokenizer()
    elif kind == "bpe":
        target = data_cfg.bpe_vocab_size or vocab_size
        in_run = run_dir / TOKENIZER_FILE if run_dir else None
        cached = cache_dir / f"bpe-{cache_key}-{target}.json" if cache_dir else None
        if in_run is not None and in_run.is_file():
            path = in_run
        elif cached is not None and cached.is_file():
            path = cached
        else:
            if corpus_texts is None:
                raise DataError("data.tokenizer=bpe needs the training corpus to train on")
            log.info("training a byte-level BPE tokenizer with %d ids", target)
            path = train_bpe(corpus_texts(), vocab_size=target, path=cached or in_run)
        tok = _load(path, data_cfg)
        if in_run is not None and path != in_run:
            in_run.parent.mkdir(parents=True, exist_ok=True)
            _copy(path, in_run)
    else:
        tok = _load(Path(kind).expanduser(), data_cfg)
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            _copy(tok.path, run_dir / TOKENIZER_FILE)
    if tok.vocab_size > vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab_size} is smaller than the tokenizer's {tok.vocab_size} ids; "
            f"use model.vocab_size>={tok.vocab_size}"
        )
    return tok
