"""clo_fast.packing: every packing mode gives the padded path's per-sequence log-prob sums and gradients.

Exactness is checked on tiny random Llama / Mistral / Qwen2 models (built here, no network) and on the demo
model with the demo data, fp32 (relative error ≤ 1e-5) and bf16 (within bf16 tolerance). The head runs the
chunked torch implementation except in one test through the Triton kernels (interpreted on CPU).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

from clo_fast.attention import (
    PackingError,
    attention_inputs,
    check_packing,
    default_packing,
    dense_packed_mask,
    supported_packing,
    windowed_packed_mask,
)
from clo_fast.constants import PACKING_MODES
from clo_fast.data import collate_clo
from clo_fast.model import build_policy
from clo_fast.packing import build_packed_batch, packed_length, plan_micro_batches

VOCAB = 97
PAD, EOS = 0, 1
ATTN_PARAMS = ("q_proj", "k_proj", "v_proj", "o_proj")


# ----------------------------------------------------------------------------------------- inputs
def make_examples(num: int, seed: int = 0, prompt=(3, 12), response=(2, 15), with_ref=False) -> list[dict]:
    """Tokenized CLO examples laid out as clo_fast.data.tokenize_dataset makes them: sequence k =
    prompt + response (ending in EOS), labels -100 on the prompt; lengths differ across examples and
    between the languages."""
    rng = random.Random(seed)

    def tokens(lo_hi):
        return [rng.randrange(2, VOCAB) for _ in range(rng.randint(*lo_hi))]

    out = []
    for _ in range(num):
        x_en, x_tgt = tokens(prompt), tokens(prompt)
        y_en, y_tgt = tokens(response) + [EOS], tokens(response) + [EOS]
        ids, labels = [], []
        for x, y in ((x_en, y_en), (x_en, y_tgt), (x_tgt, y_tgt), (x_tgt, y_en)):
            ids.append(x + y)
            labels.append([-100] * len(x) + y)
        ex = {"input_ids": ids, "labels": labels}
        if with_ref:
            ex["ref_logps"] = [rng.uniform(-50, -5) for _ in range(4)]
        out.append(ex)
    return out


def tiny_policy(
    arch: str = "llama",
    dtype=torch.float32,
    attn: str = "sdpa",
    head_impl: str = "torch",
    seed: int = 0,
    hidden: int = 32,
):
    import transformers

    torch.manual_seed(seed)
    common = {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": PAD,
        "eos_token_id": EOS,
        "bos_token_id": EOS,
    }
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True)
        cls = transformers.LlamaForCausalLM
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, sliding_window=None)
        cls = transformers.MistralForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(arch)
    cfg._attn_implementation = attn
    model = cls(cfg).to(dtype)
    with torch.no_grad():  # a less flat distribution than the default init gives, so sums differ per token
        model.get_output_embeddings().weight.mul_(8.0)
    policy = build_policy(model, head_impl)
    policy.eval()  # no dropout anywhere; gradients still flow
    return policy


def padded_logps(policy, examples, pad_to=16):
    b = collate_clo(examples, PAD, pad_to_multiple_of=pad_to)
    dev = next(policy.parameters()).device
    return policy(b["input_ids"].to(dev), b["attention_mask"].to(dev), b["labels"].to(dev))


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


def attn_grads(policy):
    return {
        n: p.grad.detach().clone()
        for n, p in policy.named_parameters()
        if p.grad is not None and any(k in n for k in ATTN_PARAMS)
    }


def trainable_attention(policy):
    for n, p in policy.named_parameters():
        p.requires_grad_(any(k in n for k in ATTN_PARAMS))


# ------------------------------------------------------------------------------- layout / counts
def test_layout_counts_match_the_formulas():
    exs = make_examples(5, seed=3)
    padded = collate_clo(exs, PAD, pad_to_multiple_of=16)
    labelled = int((padded["labels"] != -100).sum())
    n = [[len(s) for s in ex["input_ids"]] for ex in exs]
    p_en = [_prompt(ex, 0) for ex in exs]
    p_tgt = [_prompt(ex, 2) for ex in exs]
    expect = {
        "none": padded["input_ids"].numel(),
        # a sequence's last token is only a label, never an input
        "padding_free": sum(map(sum, n)) - 4 * len(exs),
        "prefix_shared": sum(map(sum, n)) - 4 * len(exs) - sum(p_en) - sum(p_tgt),
    }
    for mode in PACKING_MODES:
        b = build_packed_batch(exs, mode, PAD, pad_to_multiple_of=16 if mode == "none" else 1)
        assert b.body_tokens == expect[mode], mode
        # head rows = labelled rows exactly, and = Σ response tokens
        assert b.head_row_count == labelled == int(b.response_tokens.sum()), mode
        assert torch.equal(b.response_tokens, padded["response_tokens"]), mode
        assert b.num_seqs == 20 and b.num_examples == 5
        assert sum(packed_length(ex, mode) for ex in exs) == (b.real_tokens if mode != "none" else sum(map(sum, n)))
    assert expect["prefix_shared"] <= 0.75 * expect["none"]


def _prompt(ex, k):
    return next(t for t, v in enumerate(ex["labels"][k]) if v != -100)


def test_prefix_shared_layout_positions_and_double_use_of_the_last_prompt_row():
    ex = make_examples(1, seed=7)[0]
    b = build_packed_batch([ex], "prefix_shared", PAD)
    p, n0, n1 = _prompt(ex, 0), len(ex["input_ids"][0]) - 1, len(ex["input_ids"][1]) - 1  # inputs: EOS dropped
    # document 0: [x_en | y_en | y_tgt]; y_tgt's position ids continue from the prompt's end
    ids = b.input_ids[0].tolist()
    assert ids[:n0] == ex["input_ids"][0][:-1] and ids[n0 : n0 + n1 - p] == ex["input_ids"][1][p:-1]
    assert b.position_ids[0, : n0 + n1 - p].tolist() == list(range(n0)) + list(range(p, n1))
    assert b.branch_ids[: n0 + n1 - p].tolist() == [0] * p + [1] * (n0 - p) + [2] * (n1 - p)
    # the last prompt row appears twice: predicting y_en[0] for sequence 0 and y_tgt[0] for sequence 1
    rows = b.head_rows.tolist()
    dup = [r for r in set(rows) if rows.count(r) > 1]
    assert len(dup) == 2 and p - 1 in dup  # one per shared prompt (x_en and x_tgt)
    at = [i for i, r in enumerate(rows) if r == p - 1]
    assert sorted((b.head_seq_ids[i].item(), b.head_labels[i].item()) for i in at) == [
        (0, ex["input_ids"][0][p]),
        (1, ex["input_ids"][1][p]),
    ]
    # attention: y_tgt sees the prompt and itself, never y_en
    mask = attention_inputs(b, "sdpa")["attention_mask"][0, 0]
    first_tgt = n0
    assert mask[first_tgt, :p].all() and not mask[first_tgt, p:n0].any() and mask[first_tgt, first_tgt]
    assert not mask[:n0, n0:].any()  # nothing before y_tgt sees it


def test_pairs_without_a_shared_prompt_fall_back_to_separate_documents():
    ex = make_examples(1, seed=1)[0]
    ex["input_ids"][1] = [5] + ex["input_ids"][1][1:]  # sequence 1's prompt now differs from sequence 0's
    ex["input_ids"][0] = [6] + ex["input_ids"][0][1:]
    b = build_packed_batch([ex], "prefix_shared", PAD)
    assert b.body_tokens == sum(len(s) for s in ex["input_ids"]) - 4 - _prompt(ex, 2)
    policy = tiny_policy()
    with torch.no_grad():
        assert rel_err(policy(b), padded_logps(policy, [ex])) <= 1e-5


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_mode_matches_the_padded_sums_and_gradients(arch, attn):
    policy = tiny_policy(arch, attn=attn)
    trainable_attention(policy)
    exs = make_examples(4, seed=11)
    coeff = torch.randn(16, generator=torch.Generator().manual_seed(0))  # different weights per sequence

    ref = padded_logps(policy, exs)
    (coeff * ref).sum().backward()
    ref_grads = attn_grads(policy)
    assert len(ref_grads) >= 8  # 2 layers × q,k,v,o (+ Qwen2 biases)
    for mode in PACKING_MODES:
        policy.zero_grad(set_to_none=True)
        b = build_packed_batch(exs, mode, PAD, pad_to_multiple_of=16 if mode == "none" else 1)
        got = policy(b)
        assert got.shape == (16,) and got.dtype == torch.float32
        assert rel_err(got, ref) <= 1e-5, (mode, got - ref)
        (coeff * got).sum().backward()
        for name, g in attn_grads(policy).items():
            assert rel_err(g, ref_grads[name]) <= 1e-4, (mode, name)


def test_stream_padding_and_sequence_subsets():
    policy = tiny_policy()
    exs = make_examples(3, seed=5)
    with torch.no_grad():
        ref = padded_logps(policy, exs)
        for mode in ("padding_free", "prefix_shared"):
            b = build_packed_batch(exs, mode, PAD, pad_to_multiple_of=64)
            assert b.body_tokens % 64 == 0 and b.body_tokens > b.real_tokens
            assert rel_err(policy(b), ref) <= 1e-5
        for mode in PACKING_MODES:  # SFT-only runs: sequence 0 only, the others sum to 0
            b = build_packed_batch(exs, mode, PAD, sequences=(0,))
            got = policy(b).view(3, 4)
            assert rel_err(got[:, 0], ref.view(3, 4)[:, 0]) <= 1e-5
            assert got[:, 1:].abs().max() == 0 and b.response_tokens[:, 1:].sum() == 0


def test_bf16_matches_within_bf16_tolerance():
    policy = tiny_policy("llama", dtype=torch.bfloat16)
    exs = make_examples(4, seed=2)
    with torch.no_grad():
        ref32 = padded_logps(tiny_policy("llama", dtype=torch.float32), exs)
        ref = padded_logps(policy, exs)
        # the padded bf16 path's own error against fp32 sets the scale
        scale = max(rel_err(ref, ref32), 1e-3)
        for mode in PACKING_MODES:
            got = policy(build_packed_batch(exs, mode, PAD))
            assert rel_err(got, ref) <= 4 * scale + 1e-2, mode


@pytest.mark.slow
def test_triton_head_through_the_packed_rows():
    """The packed path with the Triton kernels (the interpreter on CPU): same sums and gradients as padded."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1")
    policy = tiny_policy(head_impl="auto")
    trainable_attention(policy)
    exs = make_examples(2, seed=4)
    ref = padded_logps(policy, exs)
    ref.sum().backward()
    ref_grads = attn_grads(policy)
    policy.zero_grad(set_to_none=True)
    got = policy(build_packed_batch(exs, "prefix_shared", PAD))
    assert rel_err(got, ref) <= 1e-5
    got.sum().backward()
    for name, g in attn_grads(policy).items():
        assert rel_err(g, ref_grads[name]) <= 1e-4, name


def test_ref_logps_and_device_copy():
    exs = make_examples(2, seed=9, with_ref=True)
    for mode in PACKING_MODES:
        b = build_packed_batch(exs, mode, PAD)
        assert b.ref_logps.shape == (2, 4) and b.ref_logps.dtype == torch.float32
        c = b.to("cpu")
        assert torch.equal(c.head_rows, b.head_rows) and c.mode == mode


# ------------------------------------------------------------------------------ micro-batching
@pytest.mark.parametrize("mode", PACKING_MODES)
def test_token_budget_micro_batches(mode):
    exs = make_examples(23, seed=8, prompt=(2, 30), response=(2, 40))
    budget = 300
    groups = plan_micro_batches(exs, mode, budget, pad_to_multiple_of=8)
    assert [i for g in groups for i in g] == list(range(23))  # every example once, in order
    for g in groups:
        b = build_packed_batch([exs[i] for i in g], mode, PAD, pad_to_multiple_of=8 if mode == "none" else 1)
        assert b.body_tokens <= budget or len(g) == 1
    assert sum(len(g) for g in plan_micro_batches(exs, mode, budget, max_examples=2)) == 23
    assert max(len(g) for g in plan_micro_batches(exs, mode, budget, max_examples=2)) <= 2


def test_balanced_micro_batches_have_a_fixed_count_and_even_tokens():
    from clo_fast.packing import balance_micro_batches

    exs = make_examples(21, seed=10, prompt=(2, 30), response=(2, 60))
    groups = balance_micro_batches(exs, "prefix_shared", 4)
    assert len(groups) == 4 and sorted(i for g in groups for i in g) == list(range(21))
    loads = [sum(packed_length(exs[i], "prefix_shared") for i in g) for g in groups]
    biggest = max(packed_length(ex, "prefix_shared") for ex in exs)
    assert max(loads) - min(loads) <= biggest
    assert [len(g) for g in balance_micro_batches(exs[:2], "padding_free", 3)].count(0) == 1


# --------------------------------------------------------------------------------- backends
def test_supported_modes_and_errors():
    assert default_packing("sdpa", "cpu") == "prefix_shared"
    assert default_packing("sdpa", "cuda") == "prefix_shared"
    assert default_packing("flex_attention", "cuda") == "prefix_shared"
    assert default_packing("flash_attention_2", "cuda") == "padding_free"
    assert default_packing("flex_attention", "cpu") == "none"
    assert supported_packing("flash_attention_2", "cuda") == ("none", "padding_free")
    for mode in PACKING_MODES:
        check_packing(mode, "sdpa", "cpu")
    with pytest.raises(PackingError, match="prefix_shared.*flash_attention_2.*padding_free"):
        check_packing("prefix_shared", "flash_attention_2", "cuda")
    with pytest.raises(PackingError, match="flex_attention.*CPU"):
        check_packing("padding_free", "flex_attention", "cpu")
    with pytest.raises(PackingError, match="none\\|padding_free\\|prefix_shared"):
        check_packing("packed", "sdpa", "cpu")


def test_flash_attention_gets_host_made_cu_seqlens():
    exs = make_examples(2, seed=6)
    b = build_packed_batch(exs, "padding_free", PAD)
    kw = attention_inputs(b, "flash_attention_2")
    lengths = [len(s) - 1 for ex in exs for s in ex["input_ids"]]
    assert kw["attention_mask"] is None and kw["cu_seq_lens_q"] is kw["cu_seq_lens_k"] is b.cu_seqlens
    assert b.cu_seqlens.tolist() == [sum(lengths[:i]) for i in range(len(lengths) + 1)]
    assert b.cu_seqlens.dtype == torch.int32 and kw["max_length_q"] == kw["max_length_k"] == max(lengths)
    with pytest.raises(PackingError):
        attention_inputs(build_packed_batch(exs, "prefix_shared", PAD), "flash_attention_2")


def test_flex_block_mask_allows_exactly_the_dense_mask():
    """The flex_attention BlockMask's mask_mod against the dense mask, through flex_attention itself
    (forward only: torch has no flex backward on CPU) and sdpa with the dense mask."""
    from torch.nn.attention.flex_attention import flex_attention

    from clo_fast.attention import dense_packed_mask, flex_block_mask

    exs = make_examples(3, seed=12)
    g = torch.Generator().manual_seed(0)
    for mode in ("padding_free", "prefix_shared"):
        b = build_packed_batch(exs, mode, PAD, pad_to_multiple_of=8)
        L = b.body_tokens
        q, k, v = (torch.randn(1, 2, L, 16, generator=g) for _ in range(3))
        dense = dense_packed_mask(b.doc_ids, b.branch_ids)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        with torch.no_grad():
            got = flex_attention(q, k, v, block_mask=flex_block_mask(b.doc_ids, b.branch_ids))
        assert (got - want).abs().max() <= 1e-5, mode


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "flex_attention", "flash_attention_2"])
def test_gpu_backends_match_the_padded_sums(attn):
    """On CUDA, bf16: every mode the backend supports against the padded path with the same backend."""
    if attn == "flash_attention_2":
        pytest.importorskip("flash_attn")
    # head_dim 16: flex_attention's CUDA kernels need head dims of at least 16 (the CPU tests use 8)
    policy = tiny_policy("llama", dtype=torch.bfloat16, attn=attn, head_impl="auto", hidden=64).cuda()
    trainable_attention(policy)
    exs = make_examples(4, seed=13, prompt=(20, 90), response=(20, 200))
    # reference: the padded batch with sdpa (flash_attention_2 on a padded batch would test flash, not packing)
    ref = padded_logps(tiny_policy("llama", dtype=torch.bfloat16, attn="sdpa", head_impl="auto", hidden=64).cuda(), exs)
    for mode in supported_packing(attn, "cuda"):
        b = build_packed_batch(exs, mode, PAD).to("cuda")
        got = policy(b)
        assert rel_err(got, ref) <= 2e-2, (attn, mode)
        got.sum().backward()


# ---------------------------------------------------------------------------------- demo model
@pytest.fixture(scope="module")
def demo_setup(demo_cache):
    """The demo model (cache: $CLO_FAST_TEST_CACHE when set, else the session's shared cache) and 8 tokenized
    examples of the demo data, as the demo config tokenizes them."""
    from pathlib import Path

    from clo_fast.config import load_config
    from clo_fast.data import build_text_dataset, tokenize_dataset
    from clo_fast.demo_model import ensure_demo_model
    from clo_fast.pretrained import load_tokenizer

    cache = os.environ.get("CLO_FAST_TEST_CACHE") or str(demo_cache)
    path = ensure_demo_model(cache)
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml")
    cfg.data.cache_dir = str(demo_cache)
    cfg.data.max_examples = 16
    tok = load_tokenizer(str(path))
    dsd, _ = build_text_dataset(cfg.data, progress=False)
    ds = tokenize_dataset(dsd["train"], tok, cfg.data, use_cache=False)
    examples = [{"input_ids": ds[i]["input_ids"], "labels": ds[i]["labels"]} for i in range(8)]
    return path, tok, cfg, examples


def _demo_policy(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    policy = build_policy(model, "torch")
    trainable_attention(policy)
    return policy


@pytest.mark.slow
def test_demo_model_every_mode_matches_padded_sums_loss_and_gradients(demo_setup):
    from clo_fast.loss import clo_loss

    path, tok, cfg, exs = demo_setup
    policy = _demo_policy(path)
    pad = tok.pad_token_id
    padded = collate_clo(exs, pad, pad_to_multiple_of=cfg.train.pad_to_multiple_of)
    ref = policy(padded["input_ids"], padded["attention_mask"], padded["labels"])
    ref_loss, _ = clo_loss(ref.view(-1, 4), None, padded["response_tokens"], cfg.clo.beta, cfg.clo.lam)
    ref_loss.backward()
    ref_grads = attn_grads(policy)
    for mode in PACKING_MODES:
        policy.zero_grad(set_to_none=True)
        b = build_packed_batch(exs, mode, pad, pad_to_multiple_of=cfg.train.pad_to_multiple_of if mode == "none" else 1)
        got = policy(b)
        assert rel_err(got, ref) <= 1e-5, mode
        loss, _ = clo_loss(got.view(-1, 4), None, b.response_tokens, cfg.clo.beta, cfg.clo.lam)
        assert abs(float(loss.detach()) - float(ref_loss.detach())) <= 1e-5 * max(1.0, abs(float(ref_loss.detach()))), (
            mode
        )
        loss.backward()
        for name, g in attn_grads(policy).items():
            assert rel_err(g, ref_grads[name]) <= 1e-4, (mode, name)
    # body tokens against today's padded micro-batches of the demo config (issue #10's target over the whole
    # demo train split: ≤ 0.6×; benchmarks/bench_step.py reports it)
    m = cfg.optim.micro_batch_examples
    chunks = [exs[i : i + m] for i in range(0, len(exs), m)]
    today = sum(collate_clo(c, pad, cfg.train.pad_to_multiple_of)["input_ids"].numel() for c in chunks)
    shared = sum(build_packed_batch(c, "prefix_shared", pad).body_tokens for c in chunks)
    assert shared <= 0.7 * today


@pytest.mark.slow
def test_demo_model_bf16(demo_setup):
    path, tok, cfg, exs = demo_setup
    policy = _demo_policy(path, torch.bfloat16)
    pad = tok.pad_token_id
    with torch.no_grad():
        padded = collate_clo(exs, pad, pad_to_multiple_of=16)
        ref = policy(padded["input_ids"], padded["attention_mask"], padded["labels"])
        for mode in PACKING_MODES:
            got = policy(build_packed_batch(exs, mode, pad))
            # bf16 rounds each of ~50 token log-probs to 8 bits of mantissa: compare on the sums' scale
            assert rel_err(got, ref) <= 2e-2, mode


@pytest.mark.parametrize("window", [1, 40])
def test_sdpa_spans_match_the_padded_sums_and_gradients(window):
    """sdpa attends within document-aligned spans (one call per span): spans of one document each (window 1)
    and of several documents are exact, with GQA, in both packed modes."""
    policy = tiny_policy("llama")
    trainable_attention(policy)
    exs = make_examples(3, seed=21)
    ref = padded_logps(policy, exs)
    ref.sum().backward()
    ref_grads = attn_grads(policy)
    for mode in ("padding_free", "prefix_shared"):
        b = build_packed_batch(exs, mode, PAD, attention_window=window, pad_to_multiple_of=8)
        starts = [s for s, _ in b.windows]
        assert starts[0] == 0 and b.windows[-1][1] == b.body_tokens and len(b.windows) > 1
        assert all(b.windows[i][1] == b.windows[i + 1][0] for i in range(len(b.windows) - 1))
        assert all(int(b.doc_ids[s]) != int(b.doc_ids[s - 1]) for s in starts[1:])  # spans hold whole documents
        policy.zero_grad(set_to_none=True)
        got = policy(b)
        assert rel_err(got, ref) <= 1e-5, mode
        got.sum().backward()
        for name, g in attn_grads(policy).items():
            assert rel_err(g, ref_grads[name]) <= 1e-4, (mode, name)


@pytest.mark.parametrize("mode", ["padding_free", "prefix_shared"])
@pytest.mark.parametrize("window", [1, 30, 100000])
def test_windowed_mask_is_the_dense_mask_span_by_span(mode, window):
    """The one-pass [1,1,L,W] mask equals the dense packed mask cut to each span, and nothing past it."""
    exs = make_examples(5, seed=31 + window)
    b = build_packed_batch(exs, mode, PAD, attention_window=window, pad_to_multiple_of=8)
    got = windowed_packed_mask(b.doc_ids, b.branch_ids, b.windows)[0, 0]
    dense = dense_packed_mask(b.doc_ids, b.branch_ids)[0, 0]
    width = max(e - s for s, e in b.windows)
    assert got.shape == (b.body_tokens, width)
    for s, e in b.windows:
        assert torch.equal(got[s:e, : e - s], dense[s:e, s:e])
        assert not got[s:e, e - s :].any()
        assert not dense[s:e, :s].any() and not dense[s:e, e:].any()  # spans never cut a visible pair


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_windowed_sdpa_matches_a_float64_dense_reference(kv_heads):
    """`_windowed_sdpa_forward` with spans (split q/k/v, grouped-query heads handed to sdpa on CPU) against a
    float64 softmax over the dense packed mask, outputs and q/k/v gradients, on fresh random inputs."""
    from clo_fast.attention import _windowed_sdpa_forward, register_packed_sdpa

    register_packed_sdpa()
    g = torch.Generator().manual_seed(kv_heads)
    exs = make_examples(4, seed=40 + kv_heads)
    b = build_packed_batch(exs, "prefix_shared", PAD, attention_window=40, pad_to_multiple_of=8)
    L, heads, dim = b.body_tokens, 4, 8
    q = torch.randn(1, heads, L, dim, generator=g, requires_grad=True)
    k = torch.randn(1, kv_heads, L, dim, generator=g, requires_grad=True)
    v = torch.randn(1, kv_heads, L, dim, generator=g, requires_grad=True)
    up = torch.randn(1, L, heads, dim, generator=g)
    out, _ = _windowed_sdpa_forward(
        None,
        q,
        k,
        v,
        windowed_packed_mask(b.doc_ids, b.branch_ids, b.windows),
        scaling=dim**-0.5,
        clo_windows=b.windows,
    )
    (out * up).sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    rep = heads // kv_heads
    scores = qd @ kd.repeat_interleave(rep, 1).transpose(-1, -2) * dim**-0.5
    scores = scores.masked_fill(~dense_packed_mask(b.doc_ids, b.branch_ids), float("-inf"))
    ref = (scores.softmax(-1) @ vd.repeat_interleave(rep, 1)).transpose(1, 2)
    (ref * up.double()).sum().backward()
    assert (out.double() - ref).abs().max() <= 1e-5
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert (got.double() - want).abs().max() <= 1e-5


@pytest.mark.parametrize("trainable_head", [False, True])
def test_cpu_head_chunks_across_rows_match_float64(trainable_head):
    """The CPU head's row chunks (256 rows at most): per-sequence sums, dX (and dW) over several chunks equal
    a float64 log-softmax reference (fp32 ≤ 1e-5 relative)."""
    from clo_fast.ops import _torch_chunk_rows, packed_sequence_logprobs

    g = torch.Generator().manual_seed(5)
    N, H, V, S = 700, 16, 300, 9
    assert _torch_chunk_rows(V, None, "cpu") < N  # several chunks
    x = torch.randn(N, H, generator=g, requires_grad=True)
    w = (torch.randn(V, H, generator=g) * 0.3).requires_grad_(trainable_head)
    y = torch.randint(0, V, (N,), generator=g)
    y[::7] = -100
    seq = torch.randint(0, S, (N,), generator=g)
    got = packed_sequence_logprobs(x, w, y, seq, S, impl="torch")
    coef = torch.randn(S, generator=g)
    (got * coef).sum().backward()
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    lp = torch.log_softmax(xd @ wd.T, -1).gather(1, y.clamp(min=0)[:, None]).squeeze(1) * (y != -100)
    want = torch.zeros(S, dtype=torch.float64).index_add_(0, seq, lp)
    (want * coef.double()).sum().backward()
    assert rel_err(got, want) <= 1e-5
    assert rel_err(x.grad, xd.grad) <= 1e-5
    if trainable_head:
        assert rel_err(w.grad, wd.grad) <= 1e-5


def test_packed_sdpa_is_its_own_attention_name():
    """A packed sdpa forward points that model at "clo_packed_sdpa" and leaves transformers' "sdpa" entry as it
    is: another sdpa model in the process still runs the stock function; padded batches, on the switched
    model, still match; the name is not saved with the config."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    from clo_fast.attention import PACKED_SDPA
    from clo_fast.model import attn_implementation_of

    policy, other = tiny_policy("llama"), tiny_policy("llama")
    exs = make_examples(3, seed=50)
    before = padded_logps(policy, exs).detach()
    got = policy(build_packed_batch(exs, "prefix_shared", PAD))
    assert rel_err(got, before) <= 1e-5
    assert policy.config._attn_implementation == PACKED_SDPA and attn_implementation_of(policy) == "sdpa"
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward
    assert other.config._attn_implementation == "sdpa"
    assert rel_err(padded_logps(policy, exs), before) <= 1e-6  # padded batches: stock sdpa underneath
    assert rel_err(policy(build_packed_batch(exs, "none", PAD)), before) <= 1e-5
    assert PACKED_SDPA not in policy.config.to_json_string()
