"""Tokenizers. Special ids are explicit: every document is encoded as BOS + text + EOS; PAD fills
positions that belong to no document (segment id 0) and never carries loss."""

from __future__ import annotations

import numpy as np

from llmx.errors import ConfigError


class ByteTokenizer:
    """UTF-8 bytes shifted past three special ids (the ByT5 layout): PAD=0, BOS=1, EOS=2, byte b -> b + 3."""

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


def build_tokenizer(kind: str, *, vocab_size: int):
    """The tokenizer named by `data.tokenizer`, checked against `model.vocab_size`."""
    tokenizers = {"byte": ByteTokenizer}
    if kind not in tokenizers:
        raise ConfigError(f"data.tokenizer={kind!r} is not known; choose one of: {', '.join(tokenizers)}")
    tok = tokenizers[kind]()
    if tok.vocab_size > vocab_size:
        raise ConfigError(
            f"model.vocab_size={vocab_size} is smaller than the {kind} tokenizer's {tok.vocab_size} ids; "
            f"use model.vocab_size>={tok.vocab_size}"
        )
    return tok
