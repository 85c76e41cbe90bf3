"""The data pipeline's tokens/s beside the trainer's consumption, in one run.

    python scripts/bench_data.py [--config configs/tiny.yaml] [--batches 200] [--json] [key=value ...]

The pipeline must outrun the trainer by a wide margin (10x on the tiny config) so the accelerator
never waits for data: both are measured here on the same machine, the trainer on synthetic batches.
"""

import argparse
import json
import statistics
import time

from llmx import config as config_lib
from llmx import data as data_lib
from llmx.benchmark import measure_train_step


def pipeline_tokens_per_second(cfg, *, batches: int, repeats: int = 3) -> float:
    data = data_lib.prepare_data(cfg)
    rows = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    rates = []
    for r in range(repeats):
        it = iter(data_lib.batches(data.train, data.tokenizer, seq_len=cfg.model.seq_len, global_rows=rows,
                                   seed=cfg.train.seed + r, prefetch=cfg.data.prefetch, text_field=data.text_field))
        next(it)  # threads started, first documents read
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batches * rows * cfg.model.seq_len / (time.perf_counter() - t0))
        it.close()
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = config_lib.load(args.config, ["mesh.data=1", *args.overrides])
    import jax

    pipeline = pipeline_tokens_per_second(cfg, batches=args.batches)
    trainer = measure_train_step(cfg, devices=jax.devices()[:1], steps=5)["tokens_per_second"]
    result = {"pipeline_tokens_per_second": pipeline, "trainer_tokens_per_second": trainer, "ratio": pipeline / trainer}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"pipeline {pipeline:12.0f} tokens/s   (median of 3 x {args.batches} batches)")
        print(f"trainer  {trainer:12.0f} tokens/s   (median step of {args.config} on 1 device)")
        print(f"ratio    {pipeline / trainer:12.1f} x")


if __name__ == "__main__":
    main()
