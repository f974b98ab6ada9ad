"""clo_fast.training.checkpoint: the output folder's claim, rotation, verified resume and failed writes."""

from __future__ import annotations

import json
import os

import pytest
import torch

from clo_fast.atomic import OWNER_MARKER, OutputDirError
from clo_fast.config import ConfigError, RunConfig, to_dict


def _cfg(tmp_path, **train) -> RunConfig:
    cfg = RunConfig()
    cfg.train.output_dir = str(tmp_path / "run")
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def test_fresh_run_into_a_folder_with_checkpoints_refuses_unless_resume_or_overwrite(tmp_path):
    from clo_fast.training.checkpoint import prepare_output_dir

    cfg = _cfg(tmp_path)
    prepare_output_dir(cfg, None).release()  # a new folder: created and marked
    assert (tmp_path / "run" / OWNER_MARKER).is_file()
    (tmp_path / "run" / "checkpoints" / "step_00000004").mkdir(parents=True)
    with pytest.raises(OutputDirError, match="--resume"):
        prepare_output_dir(cfg, None)
    assert (tmp_path / "run" / "checkpoints" / "step_00000004").is_dir()
    prepare_output_dir(cfg, "latest").release()
    assert (tmp_path / "run" / "checkpoints" / "step_00000004").is_dir()
    prepare_output_dir(_cfg(tmp_path, overwrite_output_dir=True), None).release()
    assert not (tmp_path / "run" / "checkpoints").exists()
    # a folder the user made is refused whatever the flags
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    cfg.train.output_dir = str(foreign)
    with pytest.raises(OutputDirError):
        prepare_output_dir(cfg, "latest")


def test_rotation_keeps_the_newest_and_never_removes_later_checkpoints(tmp_path):
    from clo_fast.training.checkpoint import rotate_checkpoints

    for s in (2, 4, 6, 20):  # step_20: left by an earlier, longer run
        (tmp_path / f"step_{s:08d}").mkdir()
    removed = rotate_checkpoints(tmp_path, "step_00000006", keep=2)
    assert removed == ["step_00000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000006", "step_00000020"]


def _fake_checkpoint(root, tag, cfg, world=1):
    from clo_fast.training.checkpoint import write_checksums

    d = root / tag
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))
    (d / "trainer_state.json").write_text(json.dumps({"step": 1, "world_size": world, "config": to_dict(cfg)}))
    write_checksums(d)
    return d


def test_resume_names_the_corrupt_file_and_the_newest_good_tag(tmp_path):
    from clo_fast.training.checkpoint import checkpoint_root, load_checkpoint

    cfg = _cfg(tmp_path)
    root = checkpoint_root(cfg)
    _fake_checkpoint(root, "step_00000002", cfg)
    bad = _fake_checkpoint(root, "step_00000004", cfg)
    (root / "latest").write_text("step_00000004")
    (bad / "mp_rank_00_model_states.pt").write_bytes(os.urandom(4096))  # corrupted after the save
    with pytest.raises(ConfigError, match=r"mp_rank_00_model_states\.pt.*sha256.*--resume step_00000002"):
        load_checkpoint(engine=None, cfg=cfg, which="latest")
    (bad / "mp_rank_00_model_states.pt").write_bytes(b"trunc")
    with pytest.raises(ConfigError, match="step_00000002"):
        load_checkpoint(engine=None, cfg=cfg, which="step_00000004")


def test_resume_refuses_a_world_size_change_and_a_model_change_states_the_rest(tmp_path, capsys):
    from clo_fast.training.checkpoint import check_resume_compatible

    saved = _cfg(tmp_path)
    state = {"world_size": 2, "config": to_dict(saved)}
    with pytest.raises(ConfigError, match="written by 2 ranks, this run has 1"):
        check_resume_compatible(state, saved, tmp_path)
    state["world_size"] = 1
    now = _cfg(tmp_path)
    now.model.name_or_path = "other/model"
    with pytest.raises(ConfigError, match="model.name_or_path"):
        check_resume_compatible(state, now, tmp_path)
    now = _cfg(tmp_path)
    now.optim.lr, now.clo.beta = 1e-3, 0.3
    changes = check_resume_compatible(state, now, tmp_path)
    assert changes == {"clo.beta": (0.1, 0.3), "optim.lr": (5e-5, 1e-3)}
    out = capsys.readouterr().err
    assert "optim.lr: 5e-05 → 0.001" in out and "clo.beta: 0.1 → 0.3" in out


def test_a_new_lr_on_resume_rebases_the_schedule(tmp_path):
    from types import SimpleNamespace

    from clo_fast.training.checkpoint import apply_optimizer_config
    from clo_fast.training.optim import build_optimizer

    cfg = _cfg(tmp_path)
    cfg.optim.warmup_steps, total = 2, 10
    model = torch.nn.Linear(3, 3)
    opt, sched = build_optimizer(model, cfg.optim, total)
    for _ in range(5):
        opt.step()
        sched.step()
    state_opt, state_sched = opt.state_dict(), sched.state_dict()
    cfg.optim.lr = 1e-3  # the resumed run's config
    opt2, sched2 = build_optimizer(model, cfg.optim, total)
    opt2.load_state_dict(state_opt)  # what the checkpoint load does: the old LR comes back
    sched2.load_state_dict(state_sched)
    lr_multiplier = sched2.lr_lambdas[0]
    assert opt2.param_groups[0]["lr"] == pytest.approx(5e-5 * lr_multiplier(5))
    apply_optimizer_config(SimpleNamespace(optimizer=opt2, lr_scheduler=sched2), cfg, {"optim.lr": (5e-5, 1e-3)})
    expected = 1e-3 * lr_multiplier(5)
    assert opt2.param_groups[0]["lr"] == pytest.approx(expected)
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_multiplier(6))


def test_a_failed_checkpoint_write_names_the_folder_and_the_free_space(tmp_path):
    from types import SimpleNamespace

    from clo_fast.training.checkpoint import save_checkpoint

    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed: basic_ios::clear")

    cfg = _cfg(tmp_path)
    with pytest.raises(OSError, match=r"\.tmp-step_00000003: writing checkpoint step_00000003 failed .* GiB free"):
        save_checkpoint(SimpleNamespace(save_checkpoint=disk_full), cfg, 3, {})
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_a_damaged_trainer_state_or_a_planted_rng_pickle_is_refused_at_start_up_naming_the_file(tmp_path):
    """Checksums recomputed after the change: the files verify, but what they hold is refused at start-up (before
    data, model and reference pass) in one line naming the file (and the field)."""
    import pickle

    from clo_fast.training.checkpoint import checkpoint_root, prepare_resume, write_checksums

    cfg = _cfg(tmp_path)
    d = _fake_checkpoint(checkpoint_root(cfg), "step_00000001", cfg)
    state = json.loads((d / "trainer_state.json").read_text())
    (d / "trainer_state.json").write_text(json.dumps({**state, "step": "abc"}))
    write_checksums(d)
    with pytest.raises(ConfigError, match=r"trainer_state\.json: field 'step' is 'abc'"):
        prepare_resume(cfg, "step_00000001")
    (d / "trainer_state.json").write_text(json.dumps(state))

    class Planted:
        def __reduce__(self):
            return (print, ("ran",))

    with open(d / "rng_state_rank0.pt", "wb") as f:
        pickle.dump(Planted(), f)
    write_checksums(d)
    with pytest.raises(ConfigError, match=r"rng_state_rank0\.pt: not a plain RNG state") as e:
        prepare_resume(cfg, "step_00000001")
    assert "\n" not in str(e.value)


def test_an_unwritable_checkpoints_folder_is_a_permission_error_at_start_up(tmp_path, monkeypatch):
    """An immutable checkpoints/ (chattr +i: even root may not write) is told as a permission problem before the
    run starts, not as "free space" at its first save. os.access stands in for the flag (the tests may run as
    root, for whom a mode bit does not deny)."""
    import clo_fast.training.checkpoint as ckpt

    cfg = _cfg(tmp_path)
    ckpt.prepare_output_dir(cfg, None).release()
    root = ckpt.checkpoint_root(cfg)
    _fake_checkpoint(root, "step_00000001", cfg)
    real_access = os.access
    monkeypatch.setattr(ckpt.os, "access", lambda p, mode: False if str(p) == str(root) else real_access(p, mode))
    with pytest.raises(OutputDirError, match=r"checkpoints: the checkpoints folder is not writable \(permission"):
        ckpt.prepare_output_dir(cfg, "latest")
    assert not (tmp_path / "run" / ".clo_fast.lock").exists()  # the refused run leaves no lock behind
