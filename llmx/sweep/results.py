"""What a sweep leaves behind: `results.csv` (one row per trial), the table printed at the end, PNG
plots drawn by Optuna's matplotlib visualisations, and `best.yaml`, the best trial's config ready for
`python -m llmx.train --config best.yaml`."""

from __future__ import annotations

import csv
import logging
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

from llmx.config import Config  # noqa: E402
from llmx.sweep.spec import SweepSpec, trial_config  # noqa: E402

log = logging.getLogger("llmx.sweep")
logging.getLogger("matplotlib.category").setLevel(logging.WARNING)  # grid values drawn as categories
PLOTS = {
    "history.png": optuna_plots.plot_optimization_history,
    "slices.png": optuna_plots.plot_slice,
    "importances.png": optuna_plots.plot_param_importances,
}


def columns(spec: SweepSpec) -> list[str]:
    return ["trial", "state", *(p.path for p in spec.space), f"best_{spec.metric}", f"final_{spec.metric}",
            "steps", "wall_seconds", "error", "dir"]


def rows(study: optuna.Study, spec: SweepSpec) -> list[dict]:
    out = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        row = {"trial": t.number, "state": t.state.name, **{p.path: t.params.get(p.path) for p in spec.space}}
        row[f"best_{spec.metric}"] = t.user_attrs.get("best_value")
        row[f"final_{spec.metric}"] = t.user_attrs.get("final_value")
        for key in ("steps", "wall_seconds", "error", "dir"):
            row[key] = t.user_attrs.get(key)
        out.append(row)
    return out


def write_csv(path: Path, table: list[dict], names: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=names)
        writer.writeheader()
        for row in table:
            writer.writerow({k: "" if row.get(k) is None else row[k] for k in names})


def format_table(table: list[dict], names: list[str]) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    shown = [n for n in names if n not in ("dir", "error")]
    cells = [[cell(row.get(n)) for n in shown] for row in table]
    widths = [max(len(n), *(len(c[i]) for c in cells)) if cells else len(n) for i, n in enumerate(shown)]
    lines = ["  ".join(n.rjust(w) for n, w in zip(shown, widths))]
    for row, c in zip(table, cells):
        line = "  ".join(v.rjust(w) for v, w in zip(c, widths))
        lines.append(line + (f"  {row['error']}" if row.get("error") else ""))
    return "\n".join(lines)


def write_plots(study: optuna.Study, sweep_dir: Path) -> list[Path]:
    """The plots Optuna can draw for this study (importances need two finished trials that differ)."""
    written = []
    for name, plot in PLOTS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's ExperimentalWarning, matplotlib's layout notes
            try:
                axes = plot(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as e:
                log.info("no %s: %s", name, str(e).splitlines()[0] if str(e) else type(e).__name__)
                plt.close("all")
                continue
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
            figure.savefig(sweep_dir / name, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(sweep_dir / name)
    return written


def best_trial(study: optuna.Study):
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trial if complete else None


def write_best(study: optuna.Study, base: Config, sweep_dir: Path, name: str) -> Path | None:
    """best.yaml: the base config with the best trial's parameters and a fresh run directory."""
    best = best_trial(study)
    if best is None:
        return None
    cfg = trial_config(base, best.params, run_dir=f"runs/{name}-best", progress=base.train.progress)
    metric = study.user_attrs.get("metric", "value")
    header = (f"# The best trial of sweep {name} ({sweep_dir}): trial {best.number}, {metric} {best.value:.4f}\n"
              f"# {', '.join(f'{k}={v}' for k, v in best.params.items())}\n")
    path = sweep_dir / "best.yaml"
    path.write_text(header + cfg.to_yaml())
    return path


def report(study: optuna.Study, spec: SweepSpec, base: Config, sweep_dir: Path, name: str) -> dict:
    """Writes results.csv, the plots and best.yaml; returns what was written and the printed table."""
    names = columns(spec)
    table = rows(study, spec)
    write_csv(sweep_dir / "results.csv", table, names)
    return {"table": format_table(table, names), "plots": write_plots(study, sweep_dir),
            "best": write_best(study, base, sweep_dir, name), "best_trial": best_trial(study)}
