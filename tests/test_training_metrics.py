"""W&B's own environment applies to the W&B logger (clo_fast.training.metrics.WandbLogger): WANDB_DIR decides where
its files go; without it they go under the run's output folder."""

from __future__ import annotations

import pytest

from clo_fast.config import load_config


def _log_one_record(tmp_path, out_name: str):
    from clo_fast.training.metrics import MetricsSink

    cfg = load_config(None, [f"train.output_dir={tmp_path / out_name}", "train.report_to=[wandb]", "train.run_name=r1"])
    (tmp_path / out_name).mkdir()
    sink = MetricsSink(cfg, 0)
    sink.write(1, {"loss": 0.75})
    sink.close()
    return (tmp_path / out_name / "wandb_run_id").read_text()


@pytest.mark.parametrize("wandb_dir", [True, False])
def test_wandb_dir_is_honoured(tmp_path, monkeypatch, wandb_dir):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    elsewhere = tmp_path / "wandb_home"
    elsewhere.mkdir()
    if wandb_dir:
        monkeypatch.setenv("WANDB_DIR", str(elsewhere))
    else:
        monkeypatch.delenv("WANDB_DIR", raising=False)
    run_id = _log_one_record(tmp_path, "run")
    pattern = f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"
    in_env_dir, in_output_dir = list(elsewhere.glob(pattern)), list((tmp_path / "run").glob(pattern))
    if wandb_dir:
        assert len(in_env_dir) == 1 and not in_output_dir and not (tmp_path / "run" / "wandb").exists()
    else:
        assert len(in_output_dir) == 1 and not in_env_dir
    (log_file,) = in_env_dir or in_output_dir
    assert b"0.75" in log_file.read_bytes()
