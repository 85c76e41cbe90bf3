"""Where a run's numbers go: `metrics.jsonl` (one JSON object per line), TensorBoard event files,
optionally one CSV file per metric (DeepSpeed's csv_monitor layout: `<dir>/<name>.csv` with a
`step,<name>` header), W&B (`llmx.tracking`, when configured), and the terminal (a progress bar and
periodic log lines). Only process 0 writes."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import sys
import time
from pathlib import Path

import jax
from tqdm.auto import tqdm

from llmx import storage

log = logging.getLogger(__name__)

# tensorboardX imports torch (only to accept torch tensors) and boto3 and google-cloud-storage (for its
# own s3:// and gs:// writers) at import time whenever they are installed: `import llmx.train` took 4.0 s
# with them, 2.2 s without (Zen 4; `python -X importtime`: torch 1.2 s, google-cloud-storage 0.3 s), and
# the trainer must not import the extras that bring them. llmx hands tensorboardX numbers only and writes
# buckets through its own factory below, so the import runs with those modules marked absent (None in
# sys.modules is Python's documented "not importable"); they are importable again afterwards, and one
# imported before stays.
_HIDDEN_FROM_TENSORBOARDX = ("torch", "boto3", "google.cloud.storage")
_hidden = [name for name in _HIDDEN_FROM_TENSORBOARDX if name not in sys.modules]
sys.modules.update(dict.fromkeys(_hidden))
try:
    from tensorboardX import SummaryWriter, record_writer
finally:
    for _name in _hidden:
        sys.modules.pop(_name, None)


def _plain(value):
    value = float(value) if not isinstance(value, (int, str)) else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


class RemoteLines:
    """A text file on an object store, which cannot append: the lines are kept (those of the run being
    resumed first) and the whole object is rewritten at most every `storage.FLUSH_SECONDS`, at each
    `flush` (every checkpoint) and at `close`."""

    def __init__(self, path):
        self.path = path
        self._text = path.read_text() if path.exists() else ""
        self._written = time.monotonic()

    def write(self, text: str) -> None:
        self._text += text
        if time.monotonic() - self._written >= storage.FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        self.path.write_text(self._text)
        self._written = time.monotonic()

    def close(self) -> None:
        self.flush()


class BucketEventFile:
    """A TensorBoard event file in a bucket, written through gcsfs like the rest of the run (rewritten
    whole at each of tensorboardX's flushes, as objects cannot be appended to). It replaces
    tensorboardX's own gs:// writer, whose `__del__` uploads once more whenever it is collected, at
    exit too, retrying for two minutes when the bucket is unreachable."""

    def __init__(self, path: str):
        self.path = storage.path(path)
        self._buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self._buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self._buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _BucketEventFiles:
    """tensorboardX's writer factory interface for a URI scheme."""

    def open(self, path: str) -> BucketEventFile:
        return BucketEventFile(path)

    def directory_check(self, path: str) -> None:
        pass  # an object store has no directories to create


for _scheme in storage.SCHEMES:
    record_writer.register_writer_factory(_scheme, _BucketEventFiles())


class MetricsWriter:
    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int, progress: bool,
                 tensorboard_dir: str = "", csv_dir: str = "", sinks: tuple = ()):
        """`sinks`: more destinations of every record, each with `log(step, record)` and `close()`
        (llmx.tracking.WandbRun)."""
        self.enabled = jax.process_index() == 0
        self._sinks = list(sinks)
        self._file = None
        self._tb = None
        self._bar = None
        self._csv_dir = Path(csv_dir) if csv_dir else None
        if not self.enabled:
            return
        path = run_dir / "metrics.jsonl"
        self._file = RemoteLines(path) if storage.is_remote(path) else open(path, "a", buffering=1)
        self._tb = SummaryWriter(str(tensorboard_dir or run_dir / "tensorboard"))
        if self._csv_dir is not None:
            self._csv_dir.mkdir(parents=True, exist_ok=True)
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        for sink in self._sinks:
            sink.log(int(step), record)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, int(step))
                if self._csv_dir is not None:
                    self._write_csv(key, int(step), value)

    def _write_csv(self, name: str, step: int, value) -> None:
        path = self._csv_dir / (name.replace("/", "_").replace(" ", "_") + ".csv")
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", name.split("/")[-1]])
            writer.writerow([step, value])

    def flush(self) -> None:
        """Everything written so far is in metrics.jsonl (a bucket's object is rewritten; local lines are already there)."""
        if self._file is not None:
            self._file.flush()

    def progress(self, step: int, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            log.info(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._tb.close()
        self._file.close()
        for sink in self._sinks:
            sink.close()
