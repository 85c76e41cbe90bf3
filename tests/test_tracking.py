"""train.wandb_project: W&B (offline mode) logs what metrics.jsonl holds, and a rerun resumes the same run."""

import json
import struct
from collections import defaultdict

import pytest
from helpers import read_metrics, small_config

from llmx.train import train

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2", reason="the wandb extra: pip install -e '.[wandb]'")


def read_wandb_log(path) -> list:
    """The protobuf Records of an offline `.wandb` file: a 7-byte W&B header, then LevelDB's log format
    (32 KiB blocks of chunks: crc32c, little-endian length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def logged_history(run_dir) -> dict[int, dict]:
    """Every history row of every offline run file under run_dir/wandb, by step."""
    rows: dict[int, dict] = defaultdict(dict)
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, list((run_dir / "wandb").rglob("*"))
    for path in files:
        for record in read_wandb_log(path):
            if record.WhichOneof("record_type") == "history":
                items = {"/".join(i.nested_key) or i.key: i.value_json for i in record.history.item}
                step = int(items.pop("_step"))
                rows[step].update({k: v for k, v in items.items() if not k.startswith("_")})
    return rows


@pytest.mark.slow
def test_wandb_offline_history_equals_metrics_jsonl_and_resumes_the_run(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = ["train.eval_every=2", "checkpoint.every=2", "train.wandb_project=llmx-test", "train.wandb_tags=a,b"]
    train(small_config(tmp_path, data_dir, *args, "train.steps=2"))
    run = tmp_path / "run"
    run_id = (run / "wandb_run_id").read_text().strip()
    train(small_config(tmp_path, data_dir, *args, "train.steps=4"))  # resumes the training and the W&B run
    assert (run / "wandb_run_id").read_text().strip() == run_id
    assert all(run_id in p.name for p in (run / "wandb").glob("offline-run-*"))

    expected: dict[int, dict] = defaultdict(dict)
    for record in read_metrics(run):
        step = record.pop("step")
        expected[step].update(record)
    logged = logged_history(run)
    runs = [r.run for p in (run / "wandb").glob("offline-run-*/run-*.wandb") for r in read_wandb_log(p)
            if r.WhichOneof("record_type") == "run"]
    assert len(runs) == 2 and {r.run_id for r in runs} == {run_id}  # the resolved config, with each start
    assert all({i.key: json.loads(i.value_json) for i in r.config.update}["train"]["steps"] in (2, 4) for r in runs)
    assert [list(r.tags) for r in runs] == [["a", "b"]] * 2
    assert sorted(logged) == sorted(expected) == [0, 1, 2, 3, 4]
    for step, record in expected.items():
        assert {k: json.loads(v) for k, v in logged[step].items()} == pytest.approx(record, rel=1e-6), step
