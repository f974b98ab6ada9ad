"""clo_fast.merge_adapter: its output follows the ownership rule of every output (absent, empty, or an earlier
merged model; never its input, never inside a run's folder, never another run's export), checked before the merge."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_llama_folder, trained_adapter

from clo_fast.atomic import atomic_directory, marked_kind
from clo_fast.config import RunConfig
from clo_fast.merge_adapter import main as merge_main


def _snapshot(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    base = tiny_llama_folder(d / "base")
    return base, trained_adapter(base, d / "adapter")


def _finished_run(folder, adapter):
    """A LoRA run's folder as train.py leaves it: marked train_run, config.yaml, hf_model (weights, model card, run
    summary) and hf_adapter (the adapter and its card), both exports."""
    from clo_fast.training.checkpoint import prepare_output_dir

    cfg = RunConfig()
    cfg.train.output_dir = str(folder)
    prepare_output_dir(cfg, None).release()
    (folder / "config.yaml").write_text("run: finished\n")
    with atomic_directory(folder / "hf_model", "export") as tmp:
        (tmp / "model.safetensors").write_bytes(b"trained weights")
        (tmp / "README.md").write_text("model card")
        (tmp / "clo_training_summary.json").write_text(json.dumps({"steps": 2}))
    with atomic_directory(folder / "hf_adapter", "export") as tmp:
        for f in adapter.iterdir():
            (tmp / f.name).write_bytes(f.read_bytes())
        (tmp / "README.md").write_text("adapter card")
    return folder


@pytest.mark.parametrize("case", ["its_own_input", "another_runs_export", "its_runs_model", "inside_its_input"])
def test_merge_never_replaces_its_input_a_run_or_an_export(tmp_path, base_and_adapter, capsys, case):
    _, adapter = base_and_adapter
    run = _finished_run(tmp_path / "run", adapter)
    other = _finished_run(tmp_path / "other_run", adapter)
    out = {
        "its_own_input": run / "hf_adapter",
        "another_runs_export": other / "hf_model",
        "its_runs_model": run / "hf_model",
        "inside_its_input": run / "hf_adapter" / "merged",
    }[case]
    before = {"run": _snapshot(run), "other": _snapshot(other)}
    assert merge_main([str(run / "hf_adapter"), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(out) in err and len(err.strip().splitlines()) == 1
    assert {"run": _snapshot(run), "other": _snapshot(other)} == before


def test_merge_refuses_an_export_folder_and_replaces_only_its_own_kind(tmp_path, base_and_adapter, capsys):
    _, adapter = base_and_adapter
    with atomic_directory(tmp_path / "exported", "export") as tmp:  # e.g. a run's hf_model copied out of its run
        (tmp / "model.safetensors").write_bytes(b"someone's model")
    before = _snapshot(tmp_path / "exported")
    assert merge_main([str(adapter), str(tmp_path / "exported")]) == 2
    assert "exported model" in capsys.readouterr().err
    assert _snapshot(tmp_path / "exported") == before
    assert merge_main([str(adapter), str(tmp_path / "merged")]) == 0
    assert marked_kind(tmp_path / "merged") == "merged_model"
    assert merge_main([str(adapter), str(tmp_path / "merged")]) == 0  # an earlier merge is replaced


def test_an_adapter_whose_local_base_is_gone_is_one_line_naming_the_field(tmp_path, base_and_adapter, capsys):
    _, adapter = base_and_adapter
    moved = tmp_path / "adapter"
    moved.mkdir()
    for f in adapter.iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    config = json.loads((moved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone" / "base")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    assert merge_main([str(moved), str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "adapter_config.json: base_model_name_or_path" in err
    assert str(tmp_path / "gone" / "base") in err and not (tmp_path / "merged").exists()
