"""`llmx.evaluate`: the same number as the trainer's eval for the same checkpoint, perplexity and bits
per byte from it, the table and JSON outputs, and one-line errors."""

import json
import math

import numpy as np
import pytest

from llmx import evaluate as ev
from llmx.cli import run as run_cli
from llmx.data import ByteTokenizer
from llmx.errors import CheckpointError
from llmx.run import restore_run

from helpers import read_metrics, small_config


def test_target_bytes_decodes_runs_so_multibyte_characters_count_once():
    tok = ByteTokenizer()
    text = tok.encode("héllo wörld")  # BOS + 13 bytes + EOS
    targets = np.stack([text[1:], text[:-1]])  # (2, 14)
    mask = np.ones_like(targets, bool)
    mask[1, :1] = False  # the BOS target of row 1 does not count (it would add 0 bytes anyway)
    assert ev.target_bytes(tok, targets, mask) == 13 + 13  # EOS and BOS are zero bytes
    mask[0, 5:8] = False  # drops "o w": row 0 becomes the runs "héll" and "örld" + EOS
    assert ev.target_bytes(tok, targets, mask) == 13 - 3 + 13


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    from llmx.train import train

    tmp = tmp_path_factory.mktemp("eval")
    cfg = small_config(tmp, data_dir, "train.steps=3", "train.eval_every=2", "checkpoint.every=2")
    summary = train(cfg)
    return cfg, summary


@pytest.mark.slow
def test_evaluate_reports_the_trainers_last_eval_loss(trained, data_dir):
    cfg, summary = trained
    run, results = ev.run_evaluation(run_dir=cfg.train.run_dir)
    assert run.step == 3
    (result,) = results
    assert result.name == "validation"
    assert result.loss == pytest.approx(summary.final_eval_loss, abs=1e-4)
    assert [m["eval_loss"] for m in read_metrics(cfg.train.run_dir) if "eval_loss" in m][-1] == pytest.approx(
        result.loss, abs=1e-4
    )
    assert math.log(result.perplexity) == pytest.approx(result.loss, rel=1e-9)
    assert result.bits_per_byte == pytest.approx(result.nats / (math.log(2) * result.n_bytes), rel=1e-12)
    # Byte tokenizer: each counted target is one byte except EOS (zero); mostly ASCII text.
    assert 0.9 * result.tokens < result.n_bytes <= result.tokens * 1.05


def test_cli_table_json_and_an_older_checkpoint(trained, capsys):
    cfg, summary = trained
    assert ev.main(["--run-dir", cfg.train.run_dir]) == 0
    table = capsys.readouterr().out
    assert "perplexity" in table and "bits/byte" in table and "validation" in table
    assert ev.main(["--run-dir", cfg.train.run_dir, "--json", "--checkpoint",
                    f"{cfg.train.run_dir}/checkpoints/2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"] == 2
    assert report["eval_sets"]["validation"]["loss"] == pytest.approx(summary.eval_losses[2], abs=1e-4)


def test_errors_are_one_line(trained, tmp_path, capsys):
    cfg, _ = trained
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.yaml").write_text(cfg.to_yaml())
    cases = [
        ["--run-dir", str(tmp_path / "empty")],  # no checkpoints
        ["--run-dir", cfg.train.run_dir, "model.d_model=64"],  # shapes do not fit
        ["--run-dir", str(tmp_path / "nowhere")],  # not a run directory
    ]
    for argv in cases:
        assert run_cli(lambda: ev.main(argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    with pytest.raises(CheckpointError, match=r"parameter blocks/mlp/w_down has shape \(2,64,32\) in the checkpoint "
                                              r"but \(2,80,32\) in the model"):
        restore_run(run_dir=cfg.train.run_dir, overrides=["model.d_ff=80"])
