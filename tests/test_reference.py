"""clo_fast.training.reference: the reference cache's key follows the weights, not the path."""

from __future__ import annotations

from helpers import save_tiny_model


def test_reference_cache_key_follows_weights_not_path(tmp_path):
    import shutil

    from clo_fast.config import RunConfig
    from clo_fast.training.reference import reference_key

    class _Data(list):
        _fingerprint = "data-fp"

    cfg, ds = RunConfig(), _Data([1, 2])
    a = save_tiny_model(tmp_path, "LlamaConfig", "LlamaForCausalLM", "a")
    key_a = reference_key(ds, cfg, str(a))
    assert reference_key(ds, cfg, str(a)) == key_a  # deterministic
    shutil.copytree(a, tmp_path / "a_copy")
    assert reference_key(ds, cfg, str(tmp_path / "a_copy"))["model_content"] == key_a["model_content"]
    shutil.rmtree(a)
    save_tiny_model(tmp_path, "LlamaConfig", "LlamaForCausalLM", "a", num_hidden_layers=2)  # new weights, same path
    assert reference_key(ds, cfg, str(a))["model_content"] != key_a["model_content"]
