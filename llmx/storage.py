"""Where a run's files live: a local directory, or a bucket named by a `gs://` URI.

`train.run_dir` (with all the trainer writes under it: checkpoints and their data-iterator state,
`metrics.jsonl`, TensorBoard events, `config.yaml`, `tokenizer.json`, `trainer.lock`),
`checkpoint.restore_from` and `train.tensorboard_dir` may be URIs. A local path stays a `pathlib.Path`,
exactly as before; a URI becomes an `etils.epath.Path`, the path type Orbax itself writes checkpoints
through (gs:// files via gcsfs, arrays via TensorStore's own GCS driver). `pathlib` alone would turn
`gs://bucket/run` into the local directory `./gs:/bucket/run`.

Why gs:// and no other scheme: Orbax 0.12.8 points TensorStore at a bucket only for gs:// (any other URI
is "not an absolute path" to it), so an s3://, az:// or hf:// run could not checkpoint. Such buckets work
mounted (mountpoint-s3, s3fs-fuse, blobfuse2: a local path), as gcsfuse mounts do for gs://.

What an object store lacks, and what llmx does instead (see the modules):
- appending to a file: `llmx.metrics` keeps `metrics.jsonl`'s lines and rewrites the whole object at most
  every `FLUSH_SECONDS` and when the run ends (a crash loses at most that much of the log, never a checkpoint);
- hard links and atomic renames, which make the local run lock: `llmx.runlock` creates the lock object
  with a conditional write (GCS `ifGenerationMatch=0`), and detects a lost race at the next heartbeat;
- a local trace directory: `train.profile_steps` needs a local `train.run_dir`.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from etils import epath

from llmx.errors import ConfigError

# scheme -> (the extra that installs its filesystem, the module epath and the run lock use for it)
SCHEMES = {"gs": ("gcs", "gcsfs")}
FLUSH_SECONDS = 30.0  # how often a remote metrics.jsonl is rewritten


def scheme(value: str | Path) -> str | None:
    """'gs' for 'gs://bucket/run'; None for a local path."""
    head, sep, _ = str(value).partition("://")
    return head if sep else None


def is_remote(path) -> bool:
    return scheme(path) is not None


def check(key: str, value: str, *, remote_ok: bool = True) -> None:
    """A ConfigError line when `value` is a URI llmx cannot write to here: an unsupported scheme, a
    key that takes only local paths (`remote_ok=False`), or gs:// without its filesystem installed."""
    name = scheme(value)
    if name is None:
        return
    if not remote_ok:
        raise ConfigError(f"{key}={value}: {key} takes a local path; use a local path or a mounted bucket "
                          "(gcsfuse, mountpoint-s3)")
    if name not in SCHEMES:
        raise ConfigError(f"{key}={value}: {name}:// is not supported (Orbax checkpoints reach only gs:// buckets); "
                          "use gs://, or mount the bucket (mountpoint-s3, s3fs-fuse, blobfuse2) and give its local path")
    extra, module = SCHEMES[name]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{key}={value}: {name}:// paths need {module}: pip install 'llmx[{extra}]'")


def path(value: str | Path) -> Path | epath.Path:
    """A `pathlib.Path` for a local path, an `epath.Path` for a URI (call `check` first)."""
    if not is_remote(value):
        return Path(value)
    _fresh_listings(scheme(value))
    return epath.Path(str(value))


def reach(key: str, value: str | Path) -> Path | epath.Path:
    """`path(value)`, after one request to its bucket: an unreachable one (no network, no credentials, no
    such bucket) is a ConfigError line naming the key and the cause, not a traceback from gcsfs's retries."""
    p = path(value)
    if is_remote(value):
        gcsfs_log = logging.getLogger("gcsfs")  # it logs every failed retry with a traceback
        level = gcsfs_log.level
        gcsfs_log.setLevel(logging.CRITICAL)
        try:
            p.exists()
        except Exception as e:  # gcsfs/aiohttp/google-auth raise assorted types for the same cause
            cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ConfigError(f"{key}={value}: cannot reach the bucket ({type(e).__name__}: {cause}); check the "
                              "network, the bucket name and Google credentials (gcloud auth application-default "
                              "login)") from None
        finally:
            gcsfs_log.setLevel(level)
    return p


def _fresh_listings(name: str) -> None:
    """fsspec filesystems cache directory listings for the life of the process; a run's bucket is written
    behind that cache (by TensorStore, by other hosts), so Orbax's step listing must not come from it."""
    import fsspec

    fsspec.config.conf.setdefault(name, {}).setdefault("use_listings_cache", False)


def absolute(value: Path | epath.Path) -> Path | epath.Path:
    """The absolute form of a local path (Orbax wants one); a URI is absolute already."""
    return value if is_remote(value) else Path(value).absolute()
