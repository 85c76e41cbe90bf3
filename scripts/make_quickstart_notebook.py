"""Writes notebooks/llmx_quickstart.ipynb (outputs stripped). The notebook is generated so that its
cells stay reviewable as code; edit this file, rerun it, commit both."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell("""# llmx quickstart: train a small Llama, plot it, plan it, sample from it

[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/llmx/blob/main/notebooks/llmx_quickstart.ipynb)

This notebook runs top to bottom on whatever the runtime has: a Colab TPU (v2-8, v5e-1), a single GPU, or the CPU
(with 8 simulated devices, so the sharded code paths run for real). It trains byte-level on the Python standard
library of the running interpreter, so nothing is downloaded.

Set `LLMX_REPO` to your clone's URL when running outside a checkout of the repository."""),
    new_code_cell("""import importlib.util, os, subprocess, sys

LLMX_REPO = os.environ.get("LLMX_REPO", "https://github.com/OWNER/llmx.git")
if importlib.util.find_spec("llmx") is None:  # not installed yet (a fresh Colab runtime)
    if not os.path.isdir("llmx"):
        subprocess.run(["git", "clone", "--depth=1", LLMX_REPO, "llmx"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "llmx"], check=True)
    sys.path.insert(0, os.path.abspath("llmx"))
print("llmx found at", importlib.util.find_spec("llmx").origin)"""),
    new_markdown_cell("""## 1. Backend and devices

On a CPU runtime we ask XLA for 8 simulated devices *before* jax is imported; on TPU/GPU the real devices are used."""),
    new_code_cell("""if "jax" not in sys.modules and not any(os.path.exists(p) for p in ("/dev/accel0", "/dev/nvidia0")) \\
        and "COLAB_TPU_ADDR" not in os.environ:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
import jax

backend, devices = jax.default_backend(), jax.devices()
print(f"backend {backend}: {len(devices)} x {devices[0].device_kind}")"""),
    new_markdown_cell("""## 2. A config that suits the hardware

The mesh is configuration: on 8 devices we use ZeRO-3 over an `fsdp` axis of 4 and tensor parallelism of 2; on one
device a plain mesh of 1. For a real run raise `train.steps`, the model size, and `seq_len`.
`LLMX_QUICKSTART_STEPS` lets CI run the notebook with a handful of steps."""),
    new_code_cell("""from llmx import config as config_lib

steps = int(os.environ.get("LLMX_QUICKSTART_STEPS", 300))
n = len(devices)
size = {
    "tpu": ["model.d_model=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4", "model.d_ff=1376",
            "model.seq_len=512", "model.dtype=bfloat16"],
    "gpu": ["model.d_model=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=4", "model.d_ff=1376",
            "model.seq_len=512", "model.dtype=bfloat16"],
}.get(backend, [])  # CPU: configs/tiny.yaml as it is
mesh = ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "mesh.zero_stage=3"] if n == 8 else ["mesh.data=-1"]
micro = ["train.micro_batch_size=2"] if n == 8 else []
cfg = config_lib.load("llmx/configs/tiny.yaml" if os.path.exists("llmx/configs/tiny.yaml") else
                      os.path.join(os.path.dirname(importlib.util.find_spec("llmx").origin), "..", "configs", "tiny.yaml"),
                      [*size, *mesh, *micro, f"train.steps={steps}", f"train.eval_every={max(steps // 4, 1)}",
                       "train.run_dir=runs/quickstart", "checkpoint.every=0", "train.sample_tokens=0",
                       f"optim.warmup_steps={max(steps // 10, 1)}"])
print(cfg.to_yaml())"""),
    new_markdown_cell("""## 3. What it will cost: the plan

`llmx.plan` compiles the real train step for this mesh without training: per-device memory of the state (beside
the ZeRO formula), XLA's memory analysis, FLOPs and the collectives in the compiled program."""),
    new_code_cell("""from llmx.plan import format_plan, plan

print(format_plan(plan(cfg)))"""),
    new_markdown_cell("""## 4. Train

A live progress bar shows loss and tokens/s; `metrics.jsonl`, TensorBoard events and checkpoints go to
`runs/quickstart`. Rerunning this cell resumes from the last checkpoint (delete the directory to start over)."""),
    new_code_cell("""from llmx.train import train

summary = train(cfg)
print(f"validation loss: {summary.eval_losses[0]:.3f} at step 0 -> {summary.final_eval_loss:.3f} at step {summary.final_step}")"""),
    new_markdown_cell("""## 5. Loss and learning rate

The curves come straight from `metrics.jsonl`; `scripts/plot_metrics.py` draws the same PNG for several runs."""),
    new_code_cell("""import matplotlib.pyplot as plt
from llmx.plot import plot_runs, read_series

series = read_series("runs/quickstart")
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
ax1.plot(*series["loss"], label="train loss")
ax1.plot(*series["eval_loss"], "o-", label="validation loss")
ax1.set_xlabel("step"); ax1.legend(); ax1.grid(alpha=0.3)
ax2.plot(*series["lr"]); ax2.set_title("learning rate"); ax2.set_xlabel("step"); ax2.grid(alpha=0.3)
plt.show()
drawn = plot_runs(["runs/quickstart"], "runs/quickstart/metrics.png")
print("wrote runs/quickstart/metrics.png with panels:", ", ".join(drawn))"""),
    new_markdown_cell("""## 6. Save, reload and sample

The run's checkpoint is restored into a fresh model (here on one device, whatever mesh it was trained on), checked
against the trainer's last validation loss, and asked to continue a prompt."""),
    new_code_cell("""from llmx.evaluate import run_evaluation
from llmx.generate import sample_text

run, results = run_evaluation(run_dir="runs/quickstart", single_device=True)
print(f"restored step {run.step}: validation loss {results[0].loss:.4f} (trainer said {summary.final_eval_loss:.4f})")
prompt = "def "
print(prompt + sample_text(run.params, run.steps.graphdef, run.tokenizer, prompt, seq_len=run.cfg.model.seq_len,
                           max_new_tokens=200, seed=0))"""),
    new_markdown_cell("""## Where next

- Bigger model / real data: `data.source=/path/to/texts` or `data.source=tfds:lm1b`, `data.tokenizer=bpe`.
- Other layouts: `mesh.zero_stage=1|2|3`, `mesh.tensor=…`; check them first with `python -m llmx.plan`.
- From the shell: `python -m llmx.train --config configs/tiny.yaml` (see the README for every key)."""),
]


def main() -> None:
    nb = new_notebook(cells=CELLS, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "accelerator": "TPU",
    })
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: regenerating the notebook changes only what changed
    out = Path(__file__).resolve().parents[1] / "notebooks" / "llmx_quickstart.ipynb"
    nbformat.write(nb, out)
    print(out)


if __name__ == "__main__":
    main()
