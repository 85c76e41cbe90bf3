"""k-fold cross-validation of a supervised fine-tune: `python -m llmx.crossval --config X --folds K
[section.key=value ...]` trains one run per fold (`data.folds=K data.fold=i`, run directory
`<train.run_dir>/fold_i`) and reports each final metric's mean ± std across the folds.

Fold i holds out the records whose content hash falls in bucket i (`llmx.data.supervised.split_records`),
so the K held-out sets are disjoint and cover every record. A fold whose run directory already holds a
finished run is read, not retrained (a cut-short driver resumes where it stopped). The metrics are the
last value of every `eval*` and `tasks/*` key in each fold's metrics.jsonl; the summary goes to
`<train.run_dir>/crossval.json` and, as a table, to stdout. std is the sample standard deviation (ddof=1).
The same grid is a sweep (`python -m llmx.sweep`, `data.fold: {grid: [0, ..., K-1]}`); this driver adds the
mean ± std that a search does not.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from llmx import config as config_lib
from llmx import storage
from llmx.cli import run as run_cli
from llmx.config import Config
from llmx.errors import ConfigError
from llmx.train import train

log = logging.getLogger(__name__)


def fold_configs(cfg: Config, folds: int) -> list[Config]:
    """One config per fold: data.folds=K, data.fold=i, its own run directory under train.run_dir."""
    if folds < 2:
        raise ConfigError(f"--folds {folds}: cross-validation needs at least 2 folds")
    base = storage.path(cfg.train.run_dir)
    return [
        cfg.replace(data={"folds": folds, "fold": i}, train={"run_dir": str(base / f"fold_{i}")})
        for i in range(folds)
    ]


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The last value of every eval and task metric of a run's metrics.jsonl."""
    path = storage.path(run_dir) / "metrics.jsonl"
    last: dict[str, float] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if (key.startswith("eval") or key.startswith("tasks/")) and isinstance(value, (int, float)):
                last[key] = float(value)
    return last


def summarize(per_fold: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {mean, std, n}} over the folds that report the metric (std: ddof=1, 0 for one fold)."""
    keys = sorted({k for fold in per_fold for k in fold})
    out = {}
    for key in keys:
        values = [fold[key] for fold in per_fold if key in fold]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
        out[key] = {"mean": mean, "std": math.sqrt(var), "n": len(values)}
    return out


def _finished(cfg: Config) -> bool:
    path = storage.path(cfg.train.run_dir) / "metrics.jsonl"
    if not path.is_file():
        return False
    steps = [json.loads(line).get("step", -1) for line in path.read_text().splitlines()]
    return bool(steps) and max(steps) >= cfg.train.steps


def crossval(cfg: Config, folds: int) -> dict:
    per_fold = []
    for fold_cfg in fold_configs(cfg, folds):
        if _finished(fold_cfg):
            log.info("fold %d: %s already finished; reading its metrics", fold_cfg.data.fold, fold_cfg.train.run_dir)
        else:
            log.info("fold %d of %d: training into %s", fold_cfg.data.fold, folds, fold_cfg.train.run_dir)
            train(fold_cfg)
        per_fold.append(final_metrics(storage.path(fold_cfg.train.run_dir)))
    summary = {"folds": folds, "per_fold": per_fold, "summary": summarize(per_fold)}
    out = storage.path(cfg.train.run_dir) / "crossval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    return summary


def format_table(summary: dict) -> str:
    lines = [f"{'metric':<36}{'mean':>10}{'std':>10}  folds"]
    for key, s in summary["summary"].items():
        lines.append(f"{key:<36}{s['mean']:>10.4f}{s['std']:>10.4f}  {s['n']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmx.crossval", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file of a supervised run (data.format)")
    parser.add_argument("--folds", type=int, required=True, help="K: the number of folds")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True)
    cfg = config_lib.load(args.config, [*args.overrides, f"data.folds={args.folds}"])
    summary = crossval(cfg, args.folds)
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
