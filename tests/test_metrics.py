"""clo_fast.training.metrics: every train.report_to name has a logger, each writes offline, JSONL on resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import run_config

from clo_fast.config import ConfigError, load_config


def test_every_report_to_name_has_a_logger():
    from clo_fast.config import REPORTERS
    from clo_fast.training.metrics import LOGGERS

    assert set(REPORTERS) == set(LOGGERS)
    with pytest.raises(ConfigError, match=r"train.report_to: must be jsonl\|tensorboard\|wandb\|mlflow, got 'neptune'"):
        load_config(None, ["train.report_to=[jsonl, neptune]"])
    with pytest.raises(ConfigError, match="train.tensorboard: removed: list tensorboard in train.report_to"):
        load_config(None, ["train.tensorboard=true"])


RECORDS = [(1, {"loss": 0.75, "rewards/accuracies": 0.5}), (2, {"loss": 0.5, "samples/sw": "Habari ya leo?"})]


@pytest.mark.slow  # starts processes for several seconds
def test_all_loggers_write_offline(tmp_path, monkeypatch):
    import mlflow
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from clo_fast.training.metrics import MetricsSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = run_config(
        tmp_path, **{"train.report_to": ["jsonl", "tensorboard", "wandb", "mlflow"], "train.run_name": "r1"}
    )
    out = tmp_path / "run"
    out.mkdir()
    sink = MetricsSink(cfg, 0)
    for step, rec in RECORDS:
        sink.write(step, rec)
    sink.close()

    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": s, **r} for s, r in RECORDS]

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 0.75), (2, 0.5)]

    run_id = (out / "wandb_run_id").read_text()
    # the offline run log (what `wandb sync` uploads) holds the history records: keys and JSON values as text
    (log_file,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    raw = log_file.read_bytes()
    assert b"rewards/accuracies" in raw and b"0.75" in raw
    (sample,) = (log_file.parent / "files" / "media").rglob("*.html")  # the sample text, as W&B HTML media
    assert "Habari ya leo?" in sample.read_text()
    assert b"target_lang" in raw  # the run config

    client = mlflow.tracking.MlflowClient((out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("clo-fast").experiment_id])
    assert run.info.run_name == "r1" and run.data.params["data.target_lang"] == "sw"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 0.75), (2, 0.5)]
    assert (
        "Habari"
        in (out / "mlruns")
        .joinpath(run.info.experiment_id, run.info.run_id, "artifacts", "samples", "step_0000002_samples_sw.txt")
        .read_text()
    )


def test_jsonl_logger_drops_lines_after_the_resumed_checkpoint(tmp_path):
    from clo_fast.training.metrics import MetricsSink

    cfg = run_config(tmp_path, **{"train.report_to": ["jsonl"]})
    (tmp_path / "run").mkdir()
    sink = MetricsSink(cfg, 0)
    for step in (1, 2, 3):
        sink.write(step, {"loss": float(step)})
    resumed = MetricsSink(cfg, 2)
    resumed.write(3, {"loss": 30.0})
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 30.0}]


# -------------------- W&B's own environment applies to the W&B logger (clo_fast.training.metrics.WandbLogger): W
LOG_ONE_RECORD = """
import sys
from pathlib import Path
from clo_fast.config import load_config
from clo_fast.training.metrics import MetricsSink

out = Path(sys.argv[1])
cfg = load_config(None, [f"train.output_dir={out}", "train.report_to=[wandb]", "train.run_name=r1"])
out.mkdir()
sink = MetricsSink(cfg, 0)
sink.write(1, {"loss": 0.75})
sink.close()
"""


@pytest.mark.slow  # starts processes for several seconds
@pytest.mark.parametrize("wandb_dir", [True, False])
def test_wandb_dir_is_honoured(tmp_path, wandb_dir):
    elsewhere, out = tmp_path / "wandb_home", tmp_path / "run"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"WANDB_MODE": "offline", "WANDB_SILENT": "true"} | ({"WANDB_DIR": str(elsewhere)} if wandb_dir else {})
    r = subprocess.run(
        [sys.executable, "-c", LOG_ONE_RECORD, str(out)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = (out / "wandb_run_id").read_text()
    pattern = f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"
    in_env_dir, in_output_dir = list(elsewhere.glob(pattern)), list(out.glob(pattern))
    if wandb_dir:
        assert len(in_env_dir) == 1 and not in_output_dir and not (out / "wandb").exists()
    else:
        assert len(in_output_dir) == 1 and not in_env_dir
    (log_file,) = in_env_dir or in_output_dir
    assert b"0.75" in log_file.read_bytes()


# ------------------------------------------------------------------------------------------------ the English guard
def test_english_guard_warns_at_the_crossing_and_again_as_it_worsens():
    from clo_fast.training.metrics import EnglishGuard

    said = []
    guard = EnglishGuard(0.05, 1e-3, said.append)
    ref = 2.549
    seen = []
    for step, now in [(0, 2.549), (6, 2.60), (12, 2.70), (18, 2.72), (24, 2.90), (30, 4.04)]:
        m = {"eval/en/nll_per_token": now, "eval/en/ref_nll_per_token": ref}
        guard.observe(step, m)
        seen.append(m["eval/en/nll_increase"])
    assert seen == pytest.approx([v / ref - 1 for v in (2.549, 2.60, 2.70, 2.72, 2.90, 4.04)])
    # +2.0% no; +5.9% yes (step 12); +6.7% is not another 5% worse; +13.8% yes; +58% yes
    assert [int(s.split()[2].rstrip(":")) for s in said] == [12, 24, 30]
    assert "optim.lr = 0.001" in said[0] and "2.549 (reference) to 2.700" in said[0]


def test_english_guard_without_a_reference_compares_with_the_first_evaluation_and_can_be_off():
    from clo_fast.training.metrics import EnglishGuard

    said = []
    guard = EnglishGuard(0.1, 3e-5, said.append)
    guard.observe(0, {"eval/en/nll_per_token": 2.0})
    guard.observe(5, {"eval/en/nll_per_token": 2.3})
    assert len(said) == 1 and "2.000 (reference) to 2.300" in said[0]
    off = EnglishGuard(None, 3e-5, said.append)
    for step, now in ((0, 2.0), (5, 9.0)):
        off.observe(step, {"eval/en/nll_per_token": now})
    assert len(said) == 1
    guard.observe(6, {"eval/loss": 1.0})  # no English score (an SFT run on the target only): nothing to say
