"""The Grain pipeline from documents to model-ready batches.

documents --(this process's shard)--> shuffle by seed, reshuffled each epoch --> tokenize (BOS text EOS)
--> concat-then-split packing into seq_len + 1 tokens --> shift into inputs/targets --> batch --> prefetch.

Packed rows carry `segment_ids` (1, 2, ... per document piece, 0 for padding) and `positions` that restart
at every document, so the model can mask attention across documents and rotate by in-document position.
The iterator's `get_state()` is saved in each checkpoint: restoring it resumes with the exact next batch.
"""

from __future__ import annotations

import grain
import numpy as np

from llmx.data.sources import document_text
from llmx.errors import DataError

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def _shift(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    tokens, seg, pos = packed["tokens"], packed["tokens_segment_ids"], packed["tokens_positions"]  # (T+1,)
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "segment_ids": seg[:-1],
        "positions": pos[:-1],
        # A target counts only when it continues the same document as its input token.
        "loss_mask": (seg[1:] == seg[:-1]) & (seg[:-1] > 0),
    }


def documents(source, *, seed: int | None, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """One epoch of this process's documents: every `process_count`-th one, shuffled by `seed`."""
    if len(source) < process_count:
        raise DataError(f"{len(source)} documents cannot be split over {process_count} processes; add data")
    ds = grain.MapDataset.source(source)[process_index::process_count]
    return ds if seed is None else ds.shuffle(seed=seed)


def batches(
    source,
    tokenizer,
    *,
    seq_len: int,
    batch_rows: int,
    seed: int | None,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
    prefetch: int = 8,
) -> grain.IterDataset:
    """An endless IterDataset of dicts of (batch_rows, seq_len) arrays for this process.

    `seed=None` keeps document order (evaluation); otherwise documents are shuffled and reshuffled
    each epoch, deterministically.
    """
    ds = documents(source, seed=seed, process_index=process_index, process_count=process_count)
    ds = ds.repeat(None).map(lambda record: {"tokens": tokenizer.encode(document_text(record))})
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * batch_rows))
    it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len + 1})
    it = it.map(_shift).batch(batch_rows, drop_remainder=True)
    if prefetch:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
    return it
