"""The Grain pipeline from documents to model-ready batches.

documents (a weighted mixture, shuffled by seed and reshuffled each epoch) --> row stream r takes every
G-th document from r (G = rows of a global batch) --> tokenize (BOS text EOS) --> concat-then-split
packing into seq_len + 1 tokens --> shift into inputs/targets --> row r of every batch --> prefetch.

Why one packing stream per batch row (the project's own idea, not Grain's): a process builds only the
rows of the global batch that its devices hold, reading only those rows' documents, and yet the global
batch is the same whether 1 or 16 processes build it. So a run behaves identically at any process
count, and the data state (one Grain state per row stream) can be regathered into the global state and
split again on resume with a different number of processes.

Packed rows carry `segment_ids` (1, 2, ... per document piece, 0 for padding) and `positions` that restart
at every document, so the model can mask attention across documents and rotate by in-document position.

Supervised records (`llmx.data.supervised`) arrive tokenized with a loss weight per token and are packed
whole, first fit (a record is never split across rows: its completion keeps its prompt), the weights
packed beside the tokens so they stay aligned; a target counts only where its weight is 1.
"""

from __future__ import annotations

from typing import Any, Sequence

import grain
import numpy as np

from llmx.data.sources import document_text
from llmx.errors import DataError


def _shift(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A packed row of T+1 tokens -> the batch row of `llmx.batch.BATCH_KEYS`, each (T,)."""
    tokens, seg, pos = packed["tokens"], packed["tokens_segment_ids"], packed["tokens_positions"]  # (T+1,)
    # A target counts only when it continues the same document as its input token, and (supervised
    # records) when its own loss weight is 1.
    mask = (seg[1:] == seg[:-1]) & (seg[:-1] > 0)
    if "weights" in packed:
        mask &= packed["weights"][1:] > 0
    return {"inputs": tokens[:-1], "targets": tokens[1:], "segment_ids": seg[:-1], "positions": pos[:-1], "loss_mask": mask}


# Supervised records are packed first fit into this many open rows per stream (more: fuller rows, more
# records held back).
PACKING_BINS = 8


def document_stream(sources, *, seed: int | None) -> grain.MapDataset:
    """The endless global document order: sources mixed by weight, each shuffled by `seed` and
    reshuffled every epoch (`seed=None`: document order, for evaluation)."""
    weighted = sources if isinstance(sources, list) else [(sources, 1.0)]
    streams = []
    for i, (source, _) in enumerate(weighted):
        if len(source) == 0:
            raise DataError("a data source has no documents")
        ds = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
        streams.append((ds if seed is None else ds.shuffle(seed=seed + i)).repeat(None))
    return streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, [w for _, w in weighted])


def process_rows(*, process_index: int, process_count: int, leading: int, rows: int) -> list[int]:
    """Global row-stream ids held by a process, in its local (leading, rows/process_count) order.

    A global batch is (leading, rows, T) with `rows` split over processes in contiguous blocks (the
    device order of `jax.make_array_from_process_local_data`); stream id = a * rows + row."""
    local = rows // process_count
    return [a * rows + process_index * local + j for a in range(leading) for j in range(local)]


class _RowsDataset(grain.IterDataset):
    """Batches whose i-th row comes from the i-th parent stream (global row-stream id `ids[i]`)."""

    def __init__(self, parents, ids: Sequence[int]):
        super().__init__(parents)
        self._ids = list(ids)

    def __iter__(self):
        return _RowsIterator([iter(p) for p in self._parents], self._ids)


class _RowsIterator(grain.DatasetIterator):
    def __init__(self, parents, ids: Sequence[int]):
        super().__init__(parents)
        self._ids = [str(i) for i in ids]

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [next(p) for p in self._parents]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}  # each (rows, T)

    def get_state(self) -> dict[str, Any]:
        """{"rows": {global stream id: Grain state}}: the union over processes is the global state."""
        return {"rows": {i: p.get_state() for i, p in zip(self._ids, self._parents)}}

    def set_state(self, state: dict[str, Any]) -> None:
        """Takes this process's streams from a local or global state; an empty state means "fresh"."""
        saved = state.get("rows", {})
        if not saved:
            return
        missing = [i for i in self._ids if i not in saved]
        if missing:
            raise DataError(
                f"the checkpoint's data state has {len(saved)} row streams but this run needs stream {missing[0]}: "
                "the global batch (micro_batch_size x grad_accum_steps x data-parallel size) must stay the same to resume"
            )
        for i, p in zip(self._ids, self._parents):
            p.set_state(saved[i])


def batches(
    sources,
    tokenizer,
    *,
    seq_len: int,
    global_rows: int,
    rows: Sequence[int] | None = None,
    seed: int | None,
    prefetch: int = 8,
    text_field: str = "text",
    supervised: bool = False,
) -> grain.IterDataset:
    """An endless IterDataset of dicts of (len(rows), seq_len) arrays: the given row streams of global
    batches of `global_rows` rows (default: all of them, in order). `supervised`: the records are
    already {"tokens", "weights"} (`llmx.data.supervised`)."""
    docs = document_stream(sources, seed=seed)
    tokenize = lambda record: {"tokens": tokenizer.encode(document_text(record, text_field))}  # noqa: E731
    rows = list(range(global_rows) if rows is None else rows)
    # Each row stream reads in the caller's thread: Grain's default (16 threads and 500 documents read
    # ahead per stream) started 64 thread pools and tokenized ~32,000 documents before a small test
    # run's first batch (20-30 s of start-up). The one prefetch thread below keeps batches ahead.
    synchronous = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    streams = []
    for r in rows:
        if supervised:
            it = docs[r::global_rows].to_iter_dataset(synchronous)
            it = grain.experimental.FirstFitPackIterDataset(
                it, length_struct={"tokens": seq_len + 1, "weights": seq_len + 1}, num_packing_bins=PACKING_BINS,
                shuffle_bins=False,
            )
        else:
            it = docs[r::global_rows].map(tokenize).to_iter_dataset(synchronous)
            it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": seq_len + 1})
        streams.append(it.map(_shift))
    ds = _RowsDataset(streams, rows)
    if prefetch:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
    return ds


def state_to_json(state: Any) -> Any:
    """A data state JSON can hold without loss: Grain compares parts of its states with tuples (e.g. an
    empty remainder is `(-1, -1)`), and JSON would bring them back as lists, so tuples are tagged."""
    if isinstance(state, tuple):
        return {"__tuple__": [state_to_json(v) for v in state]}
    if isinstance(state, list):
        return [state_to_json(v) for v in state]
    if isinstance(state, dict):
        return {k: state_to_json(v) for k, v in state.items()}
    return state


def state_from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(state_from_json(v) for v in value["__tuple__"])
        return {k: state_from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [state_from_json(v) for v in value]
    return value
