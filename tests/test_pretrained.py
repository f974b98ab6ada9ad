"""clo_fast.pretrained: model paths and the model fingerprint behind the reference cache's key."""

from __future__ import annotations

import pytest
from helpers import save_tiny_model


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
