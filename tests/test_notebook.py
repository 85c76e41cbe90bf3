"""The quickstart notebook runs top to bottom on CPU (a few steps), and the plots it and the trainer
write hold the data of metrics.jsonl."""

import struct
import time

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO
from helpers import read_metrics, small_config
from llmx.plot import plot_runs
from llmx.train import train


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return len(data), width, height


def test_trainer_plot_holds_the_metrics(tmp_path, data_dir):
    summary = train(small_config(tmp_path, data_dir, "train.steps=6", "train.eval_every=3", "train.plot=true"))
    png = summary.plot
    nbytes, width, height = _png_size(png)
    assert nbytes > 10_000 and width >= 400 and height >= 400
    drawn = plot_runs([tmp_path / "run"], tmp_path / "again.png")
    metrics = read_metrics(tmp_path / "run")
    losses = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evals = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    assert list(zip(*drawn["loss"]["run loss"])) == losses
    assert list(zip(*drawn["loss"]["run eval_loss"])) == evals
    assert [m["lr"] for m in metrics if "lr" in m] == drawn["learning rate"]["run"][1]
    assert set(drawn) == {"loss", "learning rate", "tokens / s", "MFU"}


@pytest.mark.slow
def test_plot_overlays_several_runs(tmp_path, data_dir):
    for name in ("a", "b"):
        train(small_config(tmp_path / name, data_dir, "train.steps=3", f"train.seed={ord(name)}"))
    runs = [tmp_path / "a" / "run", tmp_path / "b" / "run"]
    drawn = plot_runs(runs, tmp_path / "both.png")
    assert set(drawn["learning rate"]) == {str(r) for r in runs}
    assert {f"{r} loss" for r in runs} <= set(drawn["loss"])
    assert _png_size(tmp_path / "both.png")[0] > 10_000


@pytest.mark.slow
def test_quickstart_notebook_runs_on_cpu(tmp_path, data_dir, monkeypatch):
    nb = nbformat.read(REPO / "notebooks" / "llmx_quickstart.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "strip outputs before committing"
    monkeypatch.setenv("LLMX_QUICKSTART_STEPS", "8")  # the kernel inherits this process's environment
    monkeypatch.setenv("LLMX_DATA_DIR", str(data_dir))
    (tmp_path / "llmx").symlink_to(REPO)  # the notebook finds configs/ through a checkout named llmx
    t0 = time.time()
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert time.time() - t0 < 300
    outputs = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "restored step 8" in outputs and "validation loss" in outputs
    assert _png_size(tmp_path / "runs" / "quickstart" / "metrics.png")[0] > 10_000
