"""Shared test set-up and fixtures.

On a machine without CUDA the Triton kernels are exercised in Triton's interpreter: TRITON_INTERPRET=1
must be set before triton is imported, and stay set while kernels run. With it set, `impl="auto"`
routes CPU tensors to the Triton kernels (as in docs/DESIGN.md §3); tests that start subprocesses (DeepSpeed
launches) should drop it from the child's environment unless they mean to interpret kernels there.

Tiers: `python -m pytest -m "not slow" tests` is the inner loop (no DeepSpeed launch, no demo-model build);
CI runs everything.
"""

import os
import random
import secrets

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# before transformers / huggingface_hub are imported (they read it once): no test reaches the Hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from helpers import CHATML, LLAMA3, TEXTS, make_bpe_tokenizer


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_tokenizer():
    """A tiny BPE tokenizer trained on the bundled demo texts (all three languages), built once per session."""
    import json

    from clo_fast.data import demo_data_path

    rows = [json.loads(line) for line in demo_data_path().read_text(encoding="utf-8").splitlines()]
    texts = [v for r in rows for k, v in r.items() if k != "id"]
    chat = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    return make_bpe_tokenizer(
        texts, vocab_size=800, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], unk_token="<unk>", chat_template=chat
    )


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """A clo_fast cache dir shared by the tests that need the built demo model (test_model, test_train), so the
    demo model (~45 s of single-threaded pretraining) is built once for them instead of once per module."""
    return tmp_path_factory.mktemp("clo_fast_cache")


@pytest.fixture(scope="session")
def demo_model_dir(demo_cache):
    """The demo model, built once per session into `demo_cache` (slow: only `slow` tests may use it)."""
    from clo_fast.demo_model import ensure_demo_model

    return ensure_demo_model(demo_cache)


# ------------------------------------------------------------------------ chat-template tokenizers


@pytest.fixture(scope="module")
def chatml_tok():
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    return make_bpe_tokenizer(TEXTS, vocab_size=400, special_tokens=specials, chat_template=CHATML)


@pytest.fixture(scope="module")
def llama3_tok():
    specials = ["<pad>", "<s>", "</s>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return make_bpe_tokenizer(TEXTS, vocab_size=400, special_tokens=specials, chat_template=LLAMA3)


@pytest.fixture(scope="session")
def tiny_m2m(tmp_path_factory):
    """A tiny randomly initialised M2M100 + its sentencepiece tokenizer, saved with save_pretrained."""
    from helpers import save_tiny_m2m

    return save_tiny_m2m(tmp_path_factory.mktemp("m2m"))


@pytest.fixture
def rng():
    """A random.Random on a fresh seed each run (printed, so a failing draw can be replayed)."""
    seed = secrets.randbits(32)
    print(f"seed {seed}")  # shown when a test fails
    return random.Random(seed)
