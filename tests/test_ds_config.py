"""clo_fast.training.ds_config: the DeepSpeed JSON may not contradict the run config."""

from __future__ import annotations

import json

import pytest
from helpers import DEMO

from clo_fast.config import ConfigError, load_config


def test_deepspeed_json_may_not_contradict_the_run_config(tmp_path):
    from clo_fast.training.ds_config import build_ds_config

    js = tmp_path / "ds.json"
    js.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 8}))
    y = tmp_path / "run.yaml"
    y.write_text(f"train:\n  deepspeed_config: {js}\n")
    with pytest.raises(ConfigError, match="gradient_accumulation_steps"):
        build_ds_config(load_config(y), y, 1)
    js.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        build_ds_config(load_config(y), y, 1)
    cfg = load_config(DEMO)
    ds = build_ds_config(cfg, DEMO, 2)
    assert ds["train_batch_size"] == 2 * 2 * 2 and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
