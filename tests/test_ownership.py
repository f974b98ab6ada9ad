"""Issue #21: every output folder is owned by one kind of output (and no live run) before anything in it is
replaced; output locations never nest or collide; unmarked folders are never adopted. In-process checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from clo_fast.atomic import (
    LOCK_NAME,
    OWNER_MARKER,
    OutputDirError,
    atomic_directory,
    check_replaceable,
    claim_output_dir,
    marked_kind,
)
from clo_fast.config import ConfigError, RunConfig, load_config


def _snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _finished_run(tmp_path):
    """A training run's folder as train.py leaves it (marked train_run, with an export and metrics)."""
    from clo_fast.training.checkpoint import prepare_output_dir

    cfg = RunConfig()
    cfg.train.output_dir = str(tmp_path / "run")
    prepare_output_dir(cfg, None).release()
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002" / "weights.pt").write_bytes(b"w")
    with atomic_directory(run / "hf_model", "export") as tmp:
        (tmp / "model.safetensors").write_bytes(b"m")
    (run / "metrics.jsonl").write_text('{"step": 2}\n')
    return run


# ------------------------------------------------------------------------ case 1: same kind, no live process
def test_data_cli_refuses_a_finished_training_run_as_its_output(tmp_path, capsys):
    from clo_fast.data.cli import main

    run = _finished_run(tmp_path)
    before = _snapshot(run)
    rc = main(["--no-tokenize", "--no-progress", "--set", f"data.output_dir={run}", "--set", "data.max_examples=8"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "training run" in err and "not a text dataset" in err and str(run) in err
    assert _snapshot(run) == before


def test_an_output_of_the_same_kind_held_by_a_live_process_is_not_replaced(tmp_path):
    import socket

    with atomic_directory(tmp_path / "data", "data") as tmp:
        (tmp / "v").write_text("v1")
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": alive.pid, "host": socket.gethostname()}
        (tmp_path / "data" / LOCK_NAME).write_text(json.dumps(lock))
        refused = pytest.raises(OutputDirError, match=f"in use by a live run \\(pid {alive.pid}")
        with refused, atomic_directory(tmp_path / "data", "data") as tmp:
            (tmp / "v").write_text("v2")
        assert (tmp_path / "data" / "v").read_text() == "v1"
    finally:
        alive.kill()
        alive.wait()
    with atomic_directory(tmp_path / "data", "data") as tmp:  # its process gone: the lock is stale
        (tmp / "v").write_text("v2")
    assert (tmp_path / "data" / "v").read_text() == "v2"


@pytest.mark.parametrize(
    ("made_as", "used_as"),
    [("train_run", "data"), ("data", "train_run"), ("train_run", "reference_cache"), ("evaluation", "compare")],
)
def test_a_folder_of_one_kind_is_refused_as_another(tmp_path, made_as, used_as):
    folder = claim_output_dir(tmp_path / "x", "first", made_as)
    (folder / "file").write_text("keep")
    assert marked_kind(folder) == made_as
    with pytest.raises(OutputDirError, match="holds a .*, not a "):
        claim_output_dir(folder, "second", used_as)
    with pytest.raises(OutputDirError, match="holds a"), atomic_directory(folder, used_as):
        pass
    assert (folder / "file").read_text() == "keep" and marked_kind(folder) == made_as
    claim_output_dir(folder, "again", made_as)  # its own kind may reuse it


def test_a_marker_from_before_kinds_counts_only_with_that_kinds_own_file(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / OWNER_MARKER).write_text("created by clo_fast; only folders holding this file are replaced\n")
    (old / "config.yaml").write_text("")
    check_replaceable(old, kind="train_run")  # a run always wrote config.yaml
    with pytest.raises(OutputDirError, match="earlier version"):
        check_replaceable(old, kind="data")  # no dataset_dict.json: not provably a text dataset


# ------------------------------------------------------------------------ case 2: no nesting, no collision
def test_reference_dir_above_the_run_folder_is_refused_at_start_up(tmp_path):
    sets = [f"train.output_dir={tmp_path / 'outputs' / 'train'}", f"train.reference_dir={tmp_path / 'outputs'}"]
    with pytest.raises(ConfigError, match=r"train.output_dir .* lies inside train.reference_dir"):
        load_config(None, sets)


@pytest.mark.parametrize(
    "sets",
    [
        ["data.output_dir=o/run", "train.output_dir=o/run"],
        ["eval.output_dir=o/run/eval", "train.output_dir=o/run"],
        ["data.output_dir=o/run/../d", "eval.output_dir=o/d"],  # one folder spelled two ways
        ["train.reference_dir=o/run/hf_model", "train.output_dir=o/run"],
        ["train.reference_dir=o/data/ref", "data.output_dir=o/data"],
    ],
)
def test_output_locations_that_collide_or_nest_are_refused(tmp_path, monkeypatch, sets):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="output folders must be separate"):
        load_config(None, sets)


def test_the_default_reference_cache_inside_the_run_is_accepted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    load_config(None, ["train.output_dir=o/run", "train.reference_dir=o/run/ref_data"])


def test_a_reference_cache_is_never_published_over_a_run_folder(tmp_path):
    run = _finished_run(tmp_path)
    before = _snapshot(run)
    with pytest.raises(OutputDirError, match="training run"), atomic_directory(run, "reference_cache") as tmp:
        (tmp / "clo_ref_meta.json").write_text("{}")
    assert _snapshot(run) == before


def test_compare_out_dir_inside_another_output_is_refused_before_training(tmp_path, monkeypatch):
    from clo_fast import compare

    monkeypatch.chdir(tmp_path)
    ran = []
    monkeypatch.setattr(compare, "train_run", lambda *a, **k: ran.append(a))
    with pytest.raises(ConfigError, match=r"--out-dir .* lies inside data.output_dir"):
        compare.main(["--config", str(_demo_config()), "--set", "data.output_dir=o/d", "--out-dir", "o/d/cmp"])
    assert not ran and not (tmp_path / "o").exists()


def _demo_config():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


# ------------------------------------------------------------------------ case 3: no adoption of unmarked folders
def test_an_unmarked_folder_that_looks_like_a_run_is_not_adopted(tmp_path):
    from clo_fast.training.checkpoint import prepare_output_dir

    mine = tmp_path / "mine"
    (mine / "hf_model").mkdir(parents=True)
    (mine / "config.yaml").write_text("my: config\n")
    (mine / "metrics.jsonl").write_text('{"mine": 1}\n')
    (mine / "hf_model" / "pytorch_model.bin").write_bytes(b"my weights")
    before = _snapshot(mine)
    cfg = RunConfig()
    cfg.train.output_dir = str(mine)
    for resume in (None, "latest"):
        with pytest.raises(OutputDirError, match="not created by clo_fast"):
            prepare_output_dir(cfg, resume)
    assert _snapshot(mine) == before  # no marker written either


def test_an_unmarked_export_folder_inside_a_run_is_refused_at_start_up(tmp_path):
    from clo_fast.training.checkpoint import prepare_output_dir

    cfg = RunConfig()
    cfg.train.output_dir = str(tmp_path / "run")
    prepare_output_dir(cfg, None).release()
    (tmp_path / "run" / "hf_model").mkdir()
    (tmp_path / "run" / "hf_model" / "pytorch_model.bin").write_bytes(b"my weights")
    with pytest.raises(OutputDirError, match="hf_model"):
        prepare_output_dir(cfg, None)


# ------------------------------------------------------------------------ case 4: evaluate --out-dir
def test_evaluate_out_dir_holding_the_users_report_is_refused(tmp_path, capsys):
    from helpers import ROWS, make_model, make_tokenizer

    from clo_fast.evaluate import cli as eval_cli

    tok = make_tokenizer()
    model_dir = tmp_path / "model"
    make_model(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS))
    conf = tmp_path / "c.yaml"
    conf.write_text("data:\n  target_lang: ko\n  max_length: 128\neval:\n  max_new_tokens: 2\n  max_prompts: 1\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("my report")
    (mine / "report.json").write_text('{"mine": true}')
    argv = ["--config", str(conf), "--model", str(model_dir), "--prompts", str(prompts), "--out-dir"]
    assert eval_cli.main([*argv, str(mine)]) == 2
    assert "not created by clo_fast" in capsys.readouterr().err
    assert (mine / "report.md").read_text() == "my report" and (mine / "report.json").read_text() == '{"mine": true}'
    run = claim_output_dir(tmp_path / "run", "train.output_dir", "train_run")
    assert eval_cli.main([*argv, str(run)]) == 2  # another kind of output
    assert "training run" in capsys.readouterr().err
    assert eval_cli.main([*argv, str(tmp_path / "fresh")]) == 0  # a new folder is claimed, then reused
    assert marked_kind(tmp_path / "fresh") == "evaluation"
    assert eval_cli.main([*argv, str(tmp_path / "fresh")]) == 0


def test_a_cache_built_in_its_own_process_is_published_once_with_its_kind(tmp_path, monkeypatch):
    from clo_fast.atomic import build_in_own_process, marked_kind

    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "fake_builder.py").write_text(
        "import argparse, json, os, sys\n"
        "p = argparse.ArgumentParser(); p.add_argument('--out'); a = p.parse_args()\n"
        "if os.environ.get('FAIL_BUILD'): sys.exit('no luck')\n"
        "open(os.path.join(a.out, 'config.json'), 'w').write(json.dumps({'pid': os.getpid()}))\n"
    )
    monkeypatch.setenv("PYTHONPATH", f"{mods}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    target = tmp_path / "cache" / "thing"
    assert build_in_own_process(target, "model_cache", "fake_builder", "the thing") == target
    assert (target / "config.json").is_file() and marked_kind(target) == "model_cache"
    monkeypatch.setenv("FAIL_BUILD", "1")
    with pytest.raises(RuntimeError, match=r"building the other thing failed \(exit 1\):\n.*no luck"):
        build_in_own_process(tmp_path / "cache" / "other", "model_cache", "fake_builder", "the other thing")
    assert not (tmp_path / "cache" / "other").exists()


def test_the_world_and_the_demo_model_are_built_as_model_caches(tmp_path, monkeypatch):
    """Both builders hand a valid output kind to the shared publisher (a missing kind once broke the world)."""
    import clo_fast.demo_model as demo_model
    import clo_fast.world as world
    from clo_fast.atomic import OUTPUT_KINDS

    calls = []

    def record(target, kind, module, what, *args):
        calls.append((kind, module))

    for mod in (world, demo_model):
        monkeypatch.setattr(mod, "build_in_own_process", record)
    world.ensure_world(tmp_path)
    demo_model.ensure_demo_model(tmp_path)
    assert calls == [("model_cache", "clo_fast.world"), ("model_cache", "clo_fast.demo_model")]
    assert all(kind in OUTPUT_KINDS for kind, _ in calls)
