"""clo_fast.pretrained: model paths and the model fingerprint behind the reference cache's key."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_model, tiny_llama_folder, trained_adapter

from clo_fast.config import ConfigError, load_config
from clo_fast.pretrained import model_folder_problem, trainer_checkpoint_note


def test_missing_local_model_path_is_named_not_taken_for_a_hub_id(tmp_path):
    from clo_fast.config import ConfigError
    from clo_fast.pretrained import resolve_model_path

    missing = tmp_path / "models" / "my-llama"
    with pytest.raises(ConfigError, match=r"model.name_or_path: local model folder not found: .*my-llama"):
        resolve_model_path(str(missing))
    assert resolve_model_path("owner/name") == "owner/name"  # a hub id is passed on as it is


def test_fingerprint_memo_skips_unchanged_files_and_rereads_changed_ones(tmp_path):
    import json
    import os

    from clo_fast.pretrained import model_fingerprint

    a = save_tiny_model(tmp_path, "LlamaConfig", "LlamaForCausalLM", "a")
    memo = tmp_path / "memo"
    true_fp = model_fingerprint(str(a))
    assert model_fingerprint(str(a), memo_dir=str(memo)) == true_fp  # first call: every file read, memo written
    (memo_file,) = (memo / "fingerprints").glob("*.json")
    entries = json.loads(memo_file.read_text())
    weights = next(k for k in entries if k.endswith(".safetensors"))
    entries[weights][-1] = "0" * 64  # a planted digest: used while the file's stamp is unchanged
    memo_file.write_text(json.dumps(entries))
    assert model_fingerprint(str(a), memo_dir=str(memo)) != true_fp  # proves the memo was read, not the file
    st = os.stat(a / weights)
    os.utime(a / weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # the file "changed": read again
    assert model_fingerprint(str(a), memo_dir=str(memo)) == true_fp
    memo_file.write_text("{damaged")
    assert model_fingerprint(str(a), memo_dir=str(memo)) == true_fp  # a damaged memo only costs a re-hash


def test_hub_snapshot_fingerprint_uses_blob_hashes(tmp_path, monkeypatch):
    from clo_fast.pretrained import model_fingerprint

    repo = tmp_path / "hub" / "models--org--tiny"
    blob = repo / "blobs" / ("ab" * 32)
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"weights v1")
    snap = repo / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(blob)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    fp = model_fingerprint("org/tiny")
    blob2 = repo / "blobs" / ("cd" * 32)
    blob2.write_bytes(b"weights v1")  # same bytes, another blob name: the name is what counts
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(blob2)
    assert model_fingerprint("org/tiny") != fp
    with pytest.raises(ValueError, match="neither a local folder nor in the Hugging Face cache"):
        model_fingerprint("org/absent")


# -------------------- Starting a run from something that is not a model folder (clo_fast.pretrained.model_folder
def test_an_adapter_is_refused_at_start_up_and_the_command_given_merges_it(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from clo_fast.merge_adapter import main as merge_main
    from clo_fast.training.preflight import check_environment

    base = tiny_llama_folder(tmp_path / "base")
    adapter = trained_adapter(base, tmp_path / "adapter")
    cfg = load_config(None, [f"model.name_or_path={adapter}"])
    flagged = r"--set model\.name_or_path=\S+: model\.name_or_path: "  # the setting's flag names it
    with pytest.raises(ConfigError, match=flagged + ".*adapter is a LoRA adapter") as e:
        check_environment(cfg, Path("c.yaml"))
    (command,) = re.findall(r"`(python -m clo_fast\.merge_adapter [^`]+)`", str(e.value))
    args = shlex.split(command)[3:]
    assert merge_main(args) == 0
    merged_dir = Path(args[1])
    assert merged_dir == tmp_path / "adapter-merged" and model_folder_problem(str(merged_dir)) is None
    check_environment(load_config(None, [f"model.name_or_path={merged_dir}"]), Path("c.yaml"))

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    assert not torch.allclose(want, plain, atol=1e-3)  # the adapter changes the model ...
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # ... and the merged folder computes the same
    assert (merged_dir / "tokenizer.json").is_file()
    assert merge_main(args) == 0  # its own output may be replaced; a folder the user made is not:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    assert merge_main([str(adapter), str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "the user's"


def test_an_hf_trainer_checkpoint_with_weights_is_started_from_with_a_note(tmp_path):
    ckpt = tiny_llama_folder(tmp_path / "checkpoint-500")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 500}))
    (ckpt / "optimizer.pt").write_bytes(b"")
    assert model_folder_problem(str(ckpt)) is None
    assert "training starts from its weights; its optimizer state" in trainer_checkpoint_note(str(ckpt))
    assert trainer_checkpoint_note(str(tiny_llama_folder(tmp_path / "plain"))) is None


def test_a_zero_shards_only_trainer_checkpoint_names_deepspeeds_gathering_command(tmp_path):
    ckpt = tmp_path / "checkpoint-40"
    (ckpt / "global_step40").mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "config.json").write_text("{}")
    why = model_folder_problem(str(ckpt))
    assert f"`python -m deepspeed.utils.zero_to_fp32 {ckpt} {ckpt}-fp32 --safe_serialization`" in why


def test_a_clo_fast_checkpoint_points_to_resume(tmp_path):
    from clo_fast.atomic import mark_ours

    step = tmp_path / "run" / "checkpoints" / "step_8"
    step.mkdir(parents=True)
    mark_ours(step, "checkpoint")
    assert "continue its run with `--resume step_8`" in model_folder_problem(str(step))


def test_hub_names_and_the_demo_are_not_folders_to_check():
    assert model_folder_problem("Qwen/Qwen2.5-3B") is None and model_folder_problem("demo") is None


def test_a_truncated_weights_file_is_refused_at_start_up_naming_it(tmp_path):
    """A model folder whose model.safetensors was cut short (an interrupted copy) is refused by the start-up check,
    not by a SafetensorError when the model loads after the data stage."""
    from clo_fast.training.preflight import check_environment

    model = tiny_llama_folder(tmp_path / "model")
    check_environment(load_config(None, [f"model.name_or_path={model}"]), Path("c.yaml"))
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    flagged = r"--set model\.name_or_path=\S+: model\.name_or_path: "
    with pytest.raises(ConfigError, match=flagged + r".*model\.safetensors: truncated"):
        check_environment(load_config(None, [f"model.name_or_path={model}"]), Path("c.yaml"))
