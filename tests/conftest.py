"""Shared test set-up and fixtures.

On a machine without CUDA the Triton kernels are exercised in Triton's interpreter: TRITON_INTERPRET=1
must be set before triton is imported, and stay set while kernels run. With it set, `impl="auto"`
routes CPU tensors to the Triton kernels (as in docs/DESIGN.md §3); tests that start subprocesses (DeepSpeed
launches) should drop it from the child's environment unless they mean to interpret kernels there.

Tiers: `python -m pytest -m "not slow" tests` is the inner loop (no DeepSpeed launch, no demo-model build);
CI runs everything.
"""

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def make_bpe_tokenizer(texts, *, vocab_size, special_tokens, unk_token=None, chat_template=None):
    """A tiny byte-level BPE tokenizer trained offline on `texts`, with a BOS prefix like Llama's.

    special_tokens must contain "<s>" (BOS), "</s>" (EOS) and "<pad>"; their order fixes their ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    extra = {"unk_token": unk_token} if unk_token else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", **extra)
    if chat_template:
        fast.chat_template = chat_template
    return fast


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


# ------------------------------------------------------------------------ the README's measured tables
README = Path(__file__).resolve().parent.parent / "README.md"


def table_rows(markdown: str) -> dict[str, list[str]]:
    """The rows of the markdown tables in `markdown`: {first cell: the other cells}."""
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 3 and not set(cells[1]) <= set("-:"):
            rows[cells[0]] = cells[1:]
    return rows


def readme_table(header: str) -> dict[str, list[str]]:
    """The README table that starts with the line `header`."""
    text = README.read_text(encoding="utf-8")
    block = text[text.index(header) :]
    return table_rows(block[: block.index("\n\n")])


def skip_unless_readme_versions() -> None:
    """The README's measured tables hold for the torch/transformers/deepspeed versions it states; with others
    the test says which differ (re-measure and update the README) instead of comparing."""
    import re

    import deepspeed
    import transformers

    text = README.read_text(encoding="utf-8")
    stated = re.search(r"torch ([\d.]+), transformers ([\d.]+), deepspeed ([\d.]+)", text).groups()
    installed = (torch.__version__.split("+")[0], transformers.__version__, deepspeed.__version__)
    if installed != stated:
        pytest.skip(
            f"the README's tables were measured with torch/transformers/deepspeed {stated}; installed {installed}: "
            "re-measure them and update the README"
        )
