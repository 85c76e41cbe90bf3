"""PNG plots of runs from their `metrics.jsonl`: loss and eval loss, learning rate, tokens/s and MFU,
several runs overlaid with a legend. Used by `scripts/plot_metrics.py` and by the trainer
(`train.plot=true`)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from llmx import storage

PANELS = (
    ("loss", "loss", ("loss", "eval_loss")),
    ("learning rate", "lr", ("lr",)),
    ("tokens / s", "tokens_per_second", ("tokens_per_second",)),
    ("MFU", "mfu", ("mfu",)),
)


def read_series(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (steps, values)} from a run's metrics.jsonl; later lines for a step win (resumes)."""
    by_metric: dict[str, dict[int, float]] = {}
    for line in (storage.path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                by_metric.setdefault(key, {})[record["step"]] = float(value)
    return {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in by_metric.items()}


def plot_runs(run_dirs: list[Path | str], out: Path | str) -> dict[str, dict[str, tuple[list, list]]]:
    """Writes the PNG to `out`; returns what was drawn, {panel title: {line label: (steps, values)}}."""
    import matplotlib

    out = storage.path(out)
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    names = [storage.path(r).name for r in run_dirs]
    if len(set(names)) < len(names):  # runs named alike (".../a/run", ".../b/run"): label by full path
        names = [str(r) for r in run_dirs]
    series = {name: read_series(r) for name, r in zip(names, run_dirs)}
    panels = [p for p in PANELS if any(m in s for s in series.values() for m in p[2])]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    drawn: dict[str, dict[str, tuple[list, list]]] = {}
    for ax, (title, _, metrics) in zip(axes[:, 0], panels):
        for run, metric_series in series.items():
            for metric in metrics:
                if metric in metric_series:
                    steps, values = metric_series[metric]
                    style = {"marker": "o"} if metric == "eval_loss" else {}
                    label = f"{run} {metric}" if len(metrics) > 1 else run
                    ax.plot(steps, values, label=label, **style)
                    drawn.setdefault(title, {})[label] = (steps, values)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    out.write_bytes(image.getvalue())  # a local file or a bucket's object alike
    plt.close(fig)
    return drawn
