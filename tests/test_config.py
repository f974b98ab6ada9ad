"""clo_fast.config (and the machinery in clo_fast/config_loading.py): bad values, keys and overrides are
errors naming the file or the --set flag and the field; defaults resolved at load; records keep no secret."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clo_fast.config import ConfigError, LoraSettings, RunConfig, load_config, to_dict

BAD = [
    ("clo:\n  beta: -1\n", "clo.beta"),
    ("optim:\n  lr: 0\n", "optim.lr"),
    ("optim:\n  micro_batch_sizes: 2\n", "optim.micro_batch_sizes: unknown key"),
    ("train:\n  precision: bf16\n", "train.precision: removed: the precision is stated once, as model.dtype"),
    ("eval:\n  batch_size: 0\n", "eval.batch_size"),  # at load, not after training (train.run_evaluation)
    ("data:\n  target_lang: en\n", "data.target_lang"),
    ("optim:\n  lr_scheduler_type: step\n", "optim.lr_scheduler_type"),
    ("model:\n  trainable_patterns: []\n", "model.trainable_patterns"),
    ("optim:\n  betas: [0.9]\n", "optim.betas"),
    ("clo:\n  mode: ppo\n", "clo.mode"),
]


@pytest.mark.parametrize("text,field", BAD)
def test_bad_config_names_the_field(tmp_path, text, field):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(p)


def test_override_errors_name_the_flag(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("clo:\n  beta: 0.2\n")
    with pytest.raises(ConfigError, match=r"^--set clo\.beta=-1: clo\.beta: must be in \(0, 10\]"):
        load_config(p, ["clo.beta=-1"])
    with pytest.raises(ConfigError, match=r"^--set optim\.lrr=1: optim\.lrr: unknown key"):
        load_config(p, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"^--set clo\.beta: expected FIELD=VALUE"):
        load_config(p, ["clo.beta"])
    p.write_text("clo:\n  beta: -1\n")
    with pytest.raises(ConfigError, match=rf"^{p}: clo\.beta"):  # a bad value in the file names the file
        load_config(p, ["clo.lam=0.3"])
    assert load_config(p, ["clo.beta=0.5"]).clo.beta == 0.5
    assert load_config(None, ["data.target_lang=sw"]).data.target_lang == "sw"  # defaults + overrides


@pytest.mark.parametrize("field", ["optim.lr=.inf", "clo.beta=.inf", "optim.eps=.nan", "optim.betas=[0.9, .nan]"])
def test_float_fields_reject_inf_and_nan(field):
    with pytest.raises(ConfigError, match="finite"):
        load_config(None, [field])


def test_exponent_without_dot_is_a_number():
    assert load_config(None, ["optim.lr=1e-4"]).optim.lr == 1e-4


@pytest.mark.parametrize("flag", ["optim.lr=[", "optim.lr.x=1"])
def test_malformed_overrides_are_config_errors(flag):
    with pytest.raises(ConfigError, match="--set"):
        load_config(None, [flag])


@pytest.mark.parametrize("field", ["translation_num_beams", "translation_batch_size", "translation_max_length"])
def test_translation_sizes_must_be_positive(field):
    with pytest.raises(ConfigError, match=f"data.{field}: must be >= 1, got 0"):
        load_config(None, [f"data.{field}=0"])


def test_run_records_store_no_key_given_in_a_url():
    cfg = RunConfig()
    cfg.eval.judge_endpoint = "https://user:pw@judge.example/v1?api-key=abc123"
    assert to_dict(cfg)["eval"]["judge_endpoint"] == "https://<redacted>@judge.example/v1?<redacted>"
    assert cfg.eval.judge_endpoint.endswith("abc123")  # the run itself still uses it


def test_lora_config_section_is_null_by_default_and_set_turns_it_on(tmp_path):
    assert load_config(None).model.lora is None
    cfg = load_config(None, ["model.lora={r: 8}"])
    assert cfg.model.lora == LoraSettings(r=8)
    assert cfg.model.lora.target_patterns == [
        "*self_attn.q_proj",
        "*self_attn.k_proj",
        "*self_attn.v_proj",
        "*self_attn.o_proj",
    ]
    with pytest.raises(ConfigError, match=r"--set model.lora=\{r: 0\}: model.lora.r: must be in \[1, 4096\]"):
        load_config(None, ["model.lora={r: 0}"])
    with pytest.raises(ConfigError, match="model.lora.dropout"):
        load_config(None, ["model.lora={dropout: 1.5}"])


def test_gpu_defaults_bf16_and_checkpointing_unless_set(monkeypatch):
    from clo_fast.config import ModelConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = ModelConfig()
    assert (cpu.dtype, cpu.gradient_checkpointing) == ("float32", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    gpu = ModelConfig()
    assert (gpu.dtype, gpu.gradient_checkpointing) == ("bfloat16", True)
    assert load_config(None, ["model.dtype=float32", "model.gradient_checkpointing=false"]).model.dtype == "float32"
    assert load_config(None, ["model.gradient_checkpointing=false"]).model.gradient_checkpointing is False


def test_system_prompts_must_be_strings(tmp_path):
    from clo_fast.config import load_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  system_prompts: {sw: 3}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: data.system_prompts.sw: must be a string"):
        load_config(cfg)


def test_attn_implementation_is_checked_against_the_attention_table():
    """Every backend the packing code supports is a valid model.attn_implementation (flex_attention and
    flash_attention_3 were refused by the config before), and an unknown one names them all."""
    from clo_fast.attention import ATTENTION_BACKENDS

    for name in ATTENTION_BACKENDS:
        assert load_config(None, [f"model.attn_implementation={name}"]).model.attn_implementation == name
    with pytest.raises(ConfigError, match=r"model.attn_implementation: must be sdpa\|eager\|flex_attention\|"):
        load_config(None, ["model.attn_implementation=paged"])


# -------------------- Sweep tools' spelling of overrides (`--section.field=VALUE`, `--section.field VALUE`): the
ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def _train_config(*flags: str):
    from clo_fast.train import parse_args

    args = parse_args(["--config", DEMO, *flags])
    return load_config(args.config, args.set)


def test_sweep_flag_gives_the_same_config_as_set():
    via_set = to_dict(_train_config("--set", "clo.beta=0.2"))
    assert via_set["clo"]["beta"] == 0.2 != to_dict(load_config(DEMO))["clo"]["beta"]
    assert to_dict(_train_config("--clo.beta=0.2")) == via_set
    assert to_dict(_train_config("--clo.beta", "0.2")) == via_set


def test_several_sweep_flags_mixed_with_set_and_yaml_values():
    cfg = _train_config(
        "--optim.lr=1e-4", "--set", "optim.max_steps=7", "--model.lora", "{r: 4}", "--train.report_to=[jsonl]"
    )
    assert (cfg.optim.lr, cfg.optim.max_steps, cfg.model.lora.r, cfg.train.report_to) == (1e-4, 7, 4, ["jsonl"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--clo.beta=-1"], r"--clo\.beta=-1: clo\.beta: must be in \(0, 10\]"),
        (["--clo.beta", "-1"], r"--clo\.beta -1: clo\.beta: must be in \(0, 10\]"),
        (["--clo.betta=0.2"], r"--clo\.betta=0\.2: clo\.betta: unknown key"),
        (["--optim.lr=[1"], r"--optim\.lr=\[1: the value is not valid YAML"),
    ],
)
def test_sweep_flags_get_the_checks_of_set_and_name_the_flag(flags, message):
    with pytest.raises(ConfigError, match=message):
        _train_config(*flags)


@pytest.mark.parametrize("flags", [["--bogus=1"], ["--nosection.beta=1"], ["--clo.beta"], ["--clo.beta", "--x"]])
def test_other_unknown_arguments_are_still_refused(flags, capsys):
    with pytest.raises(SystemExit) as e:
        _train_config(*flags)
    assert e.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_data_and_evaluate_commands_accept_the_sweep_spelling(tmp_path):
    """The same parser helper serves every command with --set: `python -m clo_fast.data` reports the error of a
    sweep flag exactly as for --set (no data is built)."""
    r = subprocess.run(
        [sys.executable, "-m", "clo_fast.data", "--config", DEMO, "--data.max_length=2", "--no-progress"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "--data.max_length=2: data.max_length: must be >= 8" in r.stderr


@pytest.mark.parametrize(
    "flags",
    [
        ["--clo.beta=0.2", "--set", "clo.beta=0.3"],
        ["--set", "clo.beta=0.3", "--clo.beta=0.2"],
        ["--clo.beta=0.3", "--clo.beta=0.2"],
    ],
)
def test_a_field_given_twice_with_two_values_is_refused_naming_both_flags(flags):
    with pytest.raises(ConfigError, match=r"clo\.beta is also set by .*clo\.beta=0\.[23] to another value") as e:
        _train_config(*flags)
    assert "0.2" in str(e.value) and "0.3" in str(e.value)
    assert _train_config("--clo.beta=0.2", "--set", "clo.beta=0.2").clo.beta == 0.2  # the same value twice: fine
    assert _train_config("--set", "clo.beta=0.3", "--set", "clo.beta=0.2").clo.beta == 0.2  # --set: the last wins


@pytest.mark.parametrize(
    ("flags", "message"),
    [  # demo.yaml sets data.target_lang: sw; the language list comes from the flag, and the message says so
        (["data.target_langs=[en, sw]"], r"^--set data\.target_langs=\[en, sw\]: data\.target_langs: lists the source"),
        (["data.target_langs=[fr]"], r"^--set data\.target_langs=\[fr\]: data\.target_langs: is \['fr'\] but data\."),
        (["data.target_langs=[fr]", "data.target_lang=fr"], r"^--set data\.target_langs=\[fr\]: data\.target_l"),
        (["data.system_prompts={fr: Sois bref.}"], r"data\.system_prompts\.fr: the run's languages are en, sw"),
        (
            ["data.sources=[{source: demo}, {source: demo, max_examples: 8}]", "data.source=demo"],
            r"data\.sources\.1\.source: 'demo' is listed twice \(also data\.sources\.0",
        ),
    ],
)
def test_language_and_source_mistakes_name_the_field_and_where_it_was_set(flags, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, flags)


def test_the_global_batch_check_names_the_flag_that_set_it():
    from clo_fast.training.sampler import StepSampler, check_global_batch

    too_big = StepSampler(10, 999, 1, 1, 0)
    cfg = load_config(DEMO, ["optim.micro_batch_examples=999"])
    with pytest.raises(ConfigError, match=r"^--set optim.micro_batch_examples=999: .* exceeds the 10 training"):
        check_global_batch(too_big, cfg, str(DEMO))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(DEMO))}: optim.micro_batch_examples: a global batch"):
        check_global_batch(too_big, load_config(DEMO), str(DEMO))
    check_global_batch(StepSampler(10, 2, 1, 1, 0), cfg, str(DEMO))  # fits: no error


@pytest.mark.parametrize(
    "override", ["train.run_name=" + "r" * 10_001, "data.system_prompts={sw: " + "p" * 10_001 + "}"]
)
def test_a_config_string_over_the_limit_is_refused_naming_the_field(override):
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{field}: a string of 10,001 characters, over the limit of 10,000") as e:
        load_config(DEMO, [override])
    assert len(str(e.value)) < 400  # the flag is named, not printed back whole


# ------------------------------------------------------------------------- each field declared once, read from there
def test_every_field_is_described_where_it_is_declared_and_the_reference_is_current():
    from clo_fast.config import config_reference
    from clo_fast.config_loading import field_docs

    docs = field_docs(RunConfig)
    assert not [d["name"] for d in docs if not d["help"]], "a config field without its comment"
    names = [d["name"] for d in docs if d["type"] != "section"]
    assert len(names) == len(set(names)) and "clo.beta" in names and "data.quality.max_repeats" in names
    reference = (Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md").read_text(encoding="utf-8")
    assert reference == config_reference(), "docs/CONFIG.md is stale: python -m clo_fast.config > docs/CONFIG.md"
    beta = next(d for d in docs if d["name"] == "clo.beta")
    assert beta["default"] == 0.1 and "DPO temperature" in beta["help"]


@pytest.mark.parametrize(
    ("module", "sections"),
    [("clo_fast.data", {"model", "data"}), ("clo_fast.evaluate", {"model", "data", "eval"}),
     ("clo_fast.compare", {"model", "data", "clo", "optim", "train", "eval"})],
)  # fmt: skip
def test_each_command_lists_the_fields_it_reads_in_its_help(module, sections):
    import subprocess
    import sys

    from clo_fast.config_loading import field_docs

    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    listed = {line.split()[0] for line in out.stdout.split("config fields")[1].splitlines()[1:] if line.strip()}
    want = {d["name"] for d in field_docs(RunConfig) if d["type"] != "section" and d["name"].split(".")[0] in sections}
    assert listed == want
