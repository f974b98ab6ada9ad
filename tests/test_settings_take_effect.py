"""Issue #21: every setting takes effect or is refused (no silently wrong run), resumes are confined and
verified, and user mistakes are clear errors at start-up. In-process checks."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from clo_fast.config import ConfigError, RunConfig, load_config, to_dict

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


# ------------------------------------------------------------------------ --set on a section, duplicate keys
def test_a_mapping_set_on_a_section_merges_with_the_files_section(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("optim:\n  epochs: 3\n  lr: 0.001\n")
    cfg = load_config(conf, ["optim={lr: 0.002}"])
    assert cfg.optim.lr == 0.002 and cfg.optim.epochs == 3  # not reset to the default 1
    cfg = load_config(conf, ["model.lora={r: 4}", "model.lora={alpha: 8}"])
    assert (cfg.model.lora.r, cfg.model.lora.alpha) == (8, 8.0)  # the last --set of a key wins, as ever


@pytest.mark.parametrize("section", ["optim", "train", "data", "clo"])
def test_null_on_a_section_is_refused(section):
    with pytest.raises(ConfigError, match=f"--set {section}=null: {section} is a section"):
        load_config(None, [f"{section}=null"])


def test_null_on_an_optional_section_still_turns_it_off():
    assert load_config(None, ["model.lora={r: 4}", "model.lora=null"]).model.lora is None


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("optim:\n  lr: 0.001\ntrain:\n  logging_steps: 2\noptim:\n  epochs: 3\n", "optim", 1),
        ("optim:\n  lr: 0.001\n  epochs: 2\n  lr: 0.1\n", "lr", 2),
    ],
)
def test_a_key_given_twice_in_a_config_file_is_refused_naming_file_key_and_lines(tmp_path, text, key, line):
    conf = tmp_path / "dup.yaml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=rf"{conf}: .*duplicate key '{key}' \(first given on line {line}\)"):
        load_config(conf)


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path):
    conf = tmp_path / "latin1.yaml"
    conf.write_bytes("data:\n  system_prompt: 'caf\xe9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{conf}: not UTF-8"):
        load_config(conf)


# ------------------------------------------------------------------------ absurd finite values, seeds
@pytest.mark.parametrize(
    ("flag", "field", "sane"),
    [
        ("clo.beta=1e30", "clo.beta", r"\(0, 10\]"),
        ("optim.lr=1e30", "optim.lr", r"\(0, 1\]"),
        ("optim.eps=0.5", "optim.eps", r"\(0, 0.01\]"),
        ("optim.weight_decay=1e6", "optim.weight_decay", r"\[0, 1\]"),
        ("optim.max_grad_norm=1e30", "optim.max_grad_norm", r"\[0, 1e4\]"),
        ("model.lora={alpha: 1e30}", "model.lora.alpha", r"\(0, 4096\]"),
        ("eval.judge_timeout_s=1e30", "eval.judge_timeout_s", r"\(0, 3600\]"),
        ("optim.seed=-1", "optim.seed", r"\[0, 2\*\*32\)"),
        ("data.seed=99999999999999", "data.seed", r"\[0, 2\*\*32\)"),
    ],
)
def test_absurd_finite_values_are_refused_with_the_sane_range(flag, field, sane):
    with pytest.raises(
        ConfigError, match=rf"--set {flag.replace('{', '.').replace('}', '.')}: {field}: must be in {sane}"
    ):
        load_config(None, [flag])


def test_every_stated_range_is_declared_with_its_field_and_checked_from_there():
    """The range is declared once, beside the field (`setting(bounds=...)`); the check and the reference read it."""
    from clo_fast.config_loading import field_docs

    allowed = {d["name"]: d["allowed"] for d in field_docs(RunConfig)}
    expected = {
        "clo.beta": "(0, 10]",
        "optim.lr": "(0, 1]",
        "optim.eps": "(0, 0.01]",
        "eval.judge_timeout_s": "(0, 3600]",
    }
    for name, bounds in expected.items():
        assert allowed[name] == bounds, name
        with pytest.raises(ConfigError, match=rf"--set {name}=0: {name}: must be in {re.escape(bounds)}, got 0"):
            load_config(None, [f"{name}=0"])
    with pytest.raises(ConfigError, match=r"optim\.max_steps: must be >= 1 or null, got 0"):
        load_config(None, ["optim.max_steps=0"])


# ------------------------------------------------------------------------ per-language settings
def test_a_system_prompt_keyed_by_another_spelling_of_the_language_applies():
    from clo_fast.data.tokenize import system_prompt_for

    cfg = load_config(None, ["data.target_lang=sw", "data.system_prompts={SW: Wewe ni msaidizi.}"])
    assert cfg.data.system_prompts == {"sw": "Wewe ni msaidizi."}
    assert system_prompt_for(cfg.data, "sw") == "Wewe ni msaidizi."
    assert system_prompt_for(cfg.data, "SW") == "Wewe ni msaidizi."
    with pytest.raises(ConfigError, match=r"data.system_prompts.sw: the language 'sw' is given twice"):
        load_config(None, ["data.system_prompts={SW: a, sw: b}"])
    with pytest.raises(ConfigError, match=r"data.system_prompts.xx: unknown language code"):
        load_config(None, ["data.system_prompts={xx: a}"])


# ------------------------------------------------------------------------ held-out split
def test_copies_of_a_training_example_never_reach_the_held_out_split(tmp_path):
    from clo_fast.config import DataConfig
    from clo_fast.data import build_text_dataset
    from clo_fast.data.split import prompt_key

    recs = [
        {"instruction": f"Question {i}?", "response": f"A {i}.", "instruction_sw": f"Swali {i}?", "response_sw": "J."}
        for i in range(20)
    ]
    # upper-case copies: of the translation only (the English reworded), and in full-width letters
    recs += [{**recs[i], "instruction": f"Reworded {i}?", "instruction_sw": f"SWALI {i}?"} for i in range(5)]
    recs += [{**recs[i], "instruction": f"ＱＵＥＳＴＩＯＮ {i}?"} for i in range(5, 10)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    cfg = DataConfig(source=str(src), target_lang="sw", cache_dir=str(tmp_path / "c"), eval_fraction=0.3)
    dsd, summary = build_text_dataset(cfg, progress=False)
    assert summary["duplicate_prompts_removed"] == 10 and len(dsd["train"]) + len(dsd["eval"]) == 20
    for column in ("prompt_en", "prompt_tgt"):
        train, held_out = ({prompt_key(p) for p in dsd[s][column]} for s in ("train", "eval"))
        assert held_out and not train & held_out


# ------------------------------------------------------------------------ resume: verified, confined, forward
def _cfg(tmp_path) -> RunConfig:
    cfg = RunConfig()
    cfg.train.output_dir = str(tmp_path / "run")
    return cfg


def _checkpoint(root, tag, cfg, step=4, checksums=True):
    from clo_fast.training.checkpoint import write_checksums

    d = root / tag
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(os.urandom(64))
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 1, "config": to_dict(cfg)}))
    if checksums:
        write_checksums(d)
    return d


def test_a_checkpoint_without_checksums_is_refused_unless_accepted_knowingly(tmp_path):
    from clo_fast.training.checkpoint import checkpoint_root, prepare_resume

    cfg = _cfg(tmp_path)
    folder = _checkpoint(checkpoint_root(cfg), "step_00000004", cfg, checksums=False)
    with pytest.raises(ConfigError, match=r"checksums.json is missing .*--resume-unverified"):
        prepare_resume(cfg, "step_00000004")
    assert prepare_resume(cfg, "step_00000004", allow_unverified=True)[0] == folder


@pytest.mark.parametrize("tag", ["../../other/run/checkpoints/step_00000002", "/abs/step_00000002", "step_2/..", "x"])
def test_resume_tags_and_the_latest_file_are_confined_to_the_runs_checkpoints(tmp_path, tag):
    from clo_fast.training.checkpoint import checkpoint_root, prepare_resume

    cfg = _cfg(tmp_path)
    other = _cfg(tmp_path / "other")
    _checkpoint(checkpoint_root(other), "step_00000002", other)
    root = checkpoint_root(cfg)
    root.mkdir(parents=True)
    with pytest.raises(ConfigError, match="not a checkpoint tag"):
        prepare_resume(cfg, tag)
    (root / "latest").write_text(tag)
    with pytest.raises(ConfigError, match=r"latest names .*not a checkpoint tag"):
        prepare_resume(cfg, "latest")


def test_a_checkpoint_tag_linked_out_of_the_run_is_refused(tmp_path):
    from clo_fast.training.checkpoint import checkpoint_root, prepare_resume

    cfg, other = _cfg(tmp_path), _cfg(tmp_path / "other")
    elsewhere = _checkpoint(checkpoint_root(other), "step_00000002", other)
    checkpoint_root(cfg).mkdir(parents=True)
    (checkpoint_root(cfg) / "step_00000002").symlink_to(elsewhere)
    with pytest.raises(ConfigError, match="leads outside"):
        prepare_resume(cfg, "step_00000002")


@pytest.mark.parametrize("total", [4, 2])
def test_a_resume_with_no_steps_left_or_going_backwards_is_refused(tmp_path, total):
    from clo_fast.training.checkpoint import check_resume_progress, checkpoint_root, prepare_resume

    cfg = _cfg(tmp_path)
    _checkpoint(checkpoint_root(cfg), "step_00000004", cfg, step=4)
    folder, state, _ = prepare_resume(cfg, "step_00000004")
    with pytest.raises(ConfigError, match=r"at step 4 and this config trains .* nothing is left.*above 4"):
        check_resume_progress(state, total, folder)
    check_resume_progress(state, 5, folder)  # steps left: accepted


def test_a_resume_that_changes_lora_is_refused_at_start_up(tmp_path):
    from clo_fast.training.checkpoint import checkpoint_root, prepare_resume

    cfg = _cfg(tmp_path)
    _checkpoint(checkpoint_root(cfg), "step_00000004", cfg)
    cfg.model.lora = load_config(None, ["model.lora={r: 4}"]).model.lora
    with pytest.raises(ConfigError, match=r"cannot resume with a changed model.lora"):
        prepare_resume(cfg, "step_00000004")


# ------------------------------------------------------------------------ compare
def _finished_compare_run(run_dir, config, overrides):
    from clo_fast.atomic import claim_output_dir
    from clo_fast.compare import RUN_MARKER, _sha256

    claim_output_dir(run_dir, "compare run folder", "train_run")
    (run_dir / "hf_model").mkdir()
    (run_dir / "hf_model" / "config.json").write_text("{}")
    marker = {"config_sha256": _sha256(config), "overrides": overrides, "launcher": None, "finished": True}
    (run_dir / RUN_MARKER).write_text(json.dumps({**marker, "seconds": 1.0, "final_metrics": {}}))


def test_compare_reuse_follows_the_config_files_content_not_its_path(tmp_path, monkeypatch):
    import shutil

    from clo_fast import compare

    config = tmp_path / "c.yaml"
    config.write_text("optim:\n  lr: 0.001\n")
    run_dir = tmp_path / "runs" / "clo-s0"
    _finished_compare_run(run_dir, config, ["x=1"])
    monkeypatch.setattr(compare.subprocess, "run", lambda *a, **k: pytest.fail("trained again"))
    assert compare.train_run(config, ["x=1"], run_dir, overwrite=False)["reused"]
    moved = tmp_path / "moved.yaml"
    shutil.copy(config, moved)  # the same content under another path: the same run
    assert compare.train_run(moved, ["x=1"], run_dir, overwrite=False)["reused"]
    config.write_text("optim:\n  lr: 0.002\n")  # edited in place: another run
    with pytest.raises(compare.CompareError, match="other settings"):
        compare.train_run(config, ["x=1"], run_dir, overwrite=False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0", "1", "0"], "--seeds: 0 given more than once"),
        (["--seeds", "-3"], "--seeds: -3 is out of range"),
        (["--launcher", "no-such-launcher-xyz --num_gpus 2"], "no-such-launcher-xyz is not found"),
    ],
)
def test_compare_refuses_repeated_seeds_bad_seeds_and_a_missing_launcher_before_training(
    tmp_path, monkeypatch, argv, message
):
    from clo_fast import compare

    monkeypatch.setattr(compare, "train_run", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ConfigError, match=message):
        compare.main(["--config", str(DEMO), "--out-dir", str(tmp_path / "cmp"), *argv])
    assert not (tmp_path / "cmp").exists()


# ------------------------------------------------------------------------ tokenized cache verified
def test_a_damaged_tokenized_cache_entry_is_named_not_trained_on(tmp_path, demo_tokenizer):
    from clo_fast.config import DataConfig
    from clo_fast.data import build_text_dataset, tokenize_dataset
    from clo_fast.data.sources import DataError

    cfg = DataConfig(target_lang="sw", cache_dir=str(tmp_path / "cache"), max_examples=8, max_length=64)
    dsd, _ = build_text_dataset(cfg, progress=False)
    first = tokenize_dataset(dsd["train"], demo_tokenizer, cfg)
    (entry,) = (tmp_path / "cache" / "tokenized").iterdir()
    assert (entry / "checksums.json").is_file()
    arrow = next(entry.rglob("*.arrow"))
    data = bytearray(arrow.read_bytes())
    data[-64] ^= 0x01  # one flipped bit: the token ids stay in range, so nothing downstream would notice
    arrow.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"{entry}: the tokenized-data cache entry is damaged .*{arrow.name}"):
        tokenize_dataset(dsd["train"], demo_tokenizer, cfg)
    import shutil

    shutil.rmtree(entry)  # as the message says: rebuilt, identical
    assert tokenize_dataset(dsd["train"], demo_tokenizer, cfg)["input_ids"] == first["input_ids"]


# ------------------------------------------------------------------------ DeepSpeed shards loaded without unpickling
class _Planted:
    def __reduce__(self):
        return (os.system, ("touch PLANTED_RAN",))


def test_deepspeed_shards_are_loaded_weights_only_and_a_planted_pickle_is_not_executed(tmp_path, monkeypatch):
    import torch
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from clo_fast.training.checkpoint import weights_only_checkpoint_engine

    monkeypatch.chdir(tmp_path)
    engine = weights_only_checkpoint_engine()
    shard = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    record = {"zero_stage": ZeroStageEnum.weights, "state": torch.arange(4.0)}  # what DeepSpeed's shards hold
    torch.save(record, shard)
    loaded = engine.load(str(shard), map_location="cpu")
    assert loaded["zero_stage"] == ZeroStageEnum.weights and torch.equal(loaded["state"], torch.arange(4.0))
    torch.save({"optimizer_state_dict": _Planted()}, shard)
    with pytest.raises(ConfigError, match=rf"{shard.name} holds a pickled object .* not loaded"):
        engine.load(str(shard), map_location="cpu")
    assert not (tmp_path / "PLANTED_RAN").exists()


def test_the_weights_only_engine_saves_in_the_format_the_run_configured(tmp_path):
    """It replaces the engine DeepSpeed built from the run's config: a default one would save the exported model
    in the legacy format, which the export's mmap load refuses (found by the compare resume test)."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from clo_fast.training.checkpoint import weights_only_checkpoint_engine

    configured = TorchCheckpointEngine()
    configured.zipfile_serialization = True  # as DeepSpeed configures it by default
    engine = weights_only_checkpoint_engine(configured)
    engine.save({"w": torch.arange(3.0)}, str(tmp_path / "m.bin"))
    assert torch.equal(torch.load(tmp_path / "m.bin", weights_only=True, mmap=True)["w"], torch.arange(3.0))


# ------------------------------------------------------------------------ checked at start-up, not after the work
def test_hub_upload_offline_or_without_a_token_and_float16_on_cpu_are_refused_at_start_up(tmp_path, monkeypatch):
    import torch

    from clo_fast.training.preflight import check_environment

    cfg = load_config(None, ["train.push_to_hub=me/clo-sw"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="train.push_to_hub: 'me/clo-sw' cannot be uploaded with HF_HUB_OFFLINE"):
        check_environment(cfg, Path("c.yaml"))
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login either
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(ConfigError, match="train.push_to_hub: no Hugging Face token"):
        check_environment(cfg, Path("c.yaml"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.dtype: float16 needs a CUDA device"):
            check_environment(load_config(None, ["model.dtype=float16"]), Path("c.yaml"))
    check_environment(load_config(None), Path("c.yaml"))  # the defaults pass


@pytest.mark.slow  # starts processes for several seconds
def test_wandb_logging_without_an_api_key_is_refused_at_start_up_unless_offline(tmp_path):
    """Checked in a process of its own: wandb.login keeps the key in process-wide state, which would leak into
    later tests that log to W&B offline. The check must never ask for a key: it runs here on a pseudo-terminal,
    where an asking wandb.login waits for ever (this hung CI)."""
    import shlex
    import subprocess
    import sys

    code = (
        "from pathlib import Path; from clo_fast.config import load_config; from clo_fast.train import "
        "check_environment; check_environment(load_config(None, ['train.report_to=[jsonl, wandb]']), Path('c.yaml'))"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "TRITON_INTERPRET"}
    base["HOME"] = str(tmp_path)  # no ~/.netrc, no stored login

    def check(**env):
        # `script` gives the child a terminal of its own, as a CI runner or a user's shell would
        cmd = ["script", "-qec", shlex.join([sys.executable, "-c", code]), "/dev/null"]
        return subprocess.run(
            cmd,
            env={**base, **env},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,  # not a race: a check that asks for a key would wait for ever; fail instead of hanging CI
        )

    r = check()
    assert r.returncode != 0
    out = r.stdout + r.stderr  # under `script`, the child's stderr arrives on the terminal, i.e. stdout
    flag = "--set train.report_to=[jsonl, wandb]"  # the setting came from the flag, not the file: named so
    assert f"{flag}: train.report_to: wandb: no W&B API key found" in out and "WANDB_MODE=offline" in out
    assert check(WANDB_MODE="offline").returncode == 0  # offline logging needs no account
    assert check(WANDB_API_KEY="x" * 40).returncode == 0  # a key is there: accepted without a network call


@pytest.mark.parametrize("size", ["lots", "5 parsecs", "-1GB"])
def test_a_bad_export_shard_size_is_refused_at_load(size):
    with pytest.raises(ConfigError, match="train.export_max_shard_size: must be a size such as 5GB"):
        load_config(None, [f"train.export_max_shard_size={size}"])
    load_config(None, ["train.export_max_shard_size=500MB"])


def test_a_permission_error_writing_a_checkpoint_is_not_called_a_full_disk(tmp_path):
    from types import SimpleNamespace

    from clo_fast.training.checkpoint import save_checkpoint

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x.pt"))

    with pytest.raises(OSError, match=r"permission denied .*x\.pt") as info:
        save_checkpoint(SimpleNamespace(save_checkpoint=denied), _cfg(tmp_path), 3, {})
    assert "free" not in str(info.value)


def test_a_missing_local_translation_model_or_its_tokenizer_is_named_at_load(tmp_path):
    missing = tmp_path / "models" / "m2m100"
    with pytest.raises(ConfigError, match=r"data.translation_model.*local model folder not found: .*m2m100"):
        load_config(DEMO, ["data.translator=hf", f"data.translation_model={missing}"])
    missing.mkdir(parents=True)
    (missing / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"data.translation_model.*holds no tokenizer"):
        load_config(DEMO, ["data.translator=hf", f"data.translation_model={missing}"])
    (missing / "tokenizer_config.json").write_text("{}")
    assert load_config(DEMO, ["data.translator=hf", f"data.translation_model={missing}"]).data.translator == "hf"
    # a hub name is not looked up at load (offline machines), it is checked when the model loads
    assert load_config(DEMO, ["data.translator=hf", "data.translation_model=facebook/m2m100_418M"])
