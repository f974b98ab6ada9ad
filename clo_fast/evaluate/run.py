"""Evaluation: language fidelity and English retention, for several models side by side.

    python -m clo_fast.evaluate --config configs/<run>.yaml --model base=<path|hub name> --model clo=<path> ...

For each model and each prompt language (English and the config's target language) on held-out prompts:

- fidelity: share of greedy responses that the language-ID package (`clo_fast.language_id`) identifies
  as the prompt's language (an empty or letter-less response counts as a miss);
- mean response length in tokens (generated tokens before the first EOS);
- reference NLL per token: teacher-forced negative log-likelihood of the held-out reference responses
  (response tokens and the closing EOS only, token-mean over the whole language) - cheap, deterministic
  and comparable across models that share a tokenizer (base vs fine-tuned);
- optionally, an LLM-judge pairwise win rate against a baseline model through an OpenAI-compatible
  endpoint (`eval.judge_endpoint`); without an endpoint the judge is skipped with a message.

Prompts come from the "eval" split of the text-level dataset (`clo_fast.data.build_text_dataset`) or from
an explicit list. Prompts are formatted as in training: `data.prompt_template` for `data.template: plain`,
the tokenizer's chat template for `data.template: chat`.

Outputs in `eval.output_dir` (or `--out-dir`): report.json, report.md (models as columns), report.png
(fidelity and NLL per model) and generations.jsonl (every prompt, response and detected language).

Python API (the training run calls it at the end, on rank 0 only):
    evaluate_models(cfg, model_paths, prompts=None, out_dir=None) -> report dict
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from clo_fast.config import ConfigError, EvalConfig, RunConfig, load_config
from clo_fast.language_id import UnknownLanguageError, get_identifier, language_fidelity, normalize_lang

IGNORE_INDEX = -100


class EvalError(ValueError):
    """Bad evaluation input: no prompts, an unreadable model path, a malformed prompt record ..."""


# ------------------------------------------------------------------------------------------ prompts
def check_eval_config(ev: EvalConfig, where: str = "<config>") -> None:
    """Range checks for the `eval` section (RunConfig.validate covers the other sections)."""

    def check(ok: bool, name: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{where}: eval.{name}: {msg}")

    check(ev.max_prompts >= 1, "max_prompts", f"must be >= 1, got {ev.max_prompts}")
    check(ev.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {ev.max_new_tokens}")
    check(ev.batch_size >= 1, "batch_size", f"must be >= 1, got {ev.batch_size}")
    check(ev.judge_timeout_s > 0, "judge_timeout_s", f"must be > 0, got {ev.judge_timeout_s}")
    for code in ev.detector_languages:
        try:
            normalize_lang(code)
        except UnknownLanguageError as e:
            raise ConfigError(f"{where}: eval.detector_languages: {e}") from None


def normalize_prompts(records: Sequence[dict], target_lang: str, max_per_lang: int | None = None) -> list[dict]:
    """Turn prompt records into evaluation items `{"id", "lang", "prompt", "reference"}`.

    A record is either a row of the text-level dataset (`prompt_en`, `response_en`, `prompt_tgt`,
    `response_tgt`, optional `id`, `target_lang`: gives one English and one target-language item), or one
    item (`prompt`, `lang`, optional `reference`, `id`). `reference` may be None (no NLL for that item).
    Keeps at most `max_per_lang` items per language, in input order.
    """
    target = normalize_lang(target_lang)
    items: list[dict] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise EvalError(f"prompt record {i}: expected a dict, got {type(rec).__name__}")
        rid = str(rec.get("id", i))
        if "prompt_en" in rec or "prompt_tgt" in rec:
            missing = [k for k in ("prompt_en", "prompt_tgt") if not isinstance(rec.get(k), str)]
            if missing:
                raise EvalError(f"prompt record {i} (id {rid}): missing or non-string {', '.join(missing)}")
            rec_lang = normalize_lang(rec.get("target_lang") or target)
            if rec_lang != target:
                raise EvalError(f"prompt record {i} (id {rid}): target_lang {rec_lang!r} != config data.target_lang {target!r}")
            items.append({"id": rid, "lang": "en", "prompt": rec["prompt_en"], "reference": rec.get("response_en")})
            items.append({"id": rid, "lang": target, "prompt": rec["prompt_tgt"], "reference": rec.get("response_tgt")})
        elif "prompt" in rec:
            if "lang" not in rec:
                raise EvalError(f"prompt record {i} (id {rid}): has 'prompt' but no 'lang'")
            if not isinstance(rec["prompt"], str):
                raise EvalError(f"prompt record {i} (id {rid}): 'prompt' must be a string")
            ref = rec.get("reference")
            if ref is not None and not isinstance(ref, str):
                raise EvalError(f"prompt record {i} (id {rid}): 'reference' must be a string or null")
            items.append({"id": rid, "lang": normalize_lang(rec["lang"]), "prompt": rec["prompt"], "reference": ref})
        else:
            raise EvalError(
                f"prompt record {i}: expected keys prompt_en/prompt_tgt (dataset row) or prompt/lang (item), "
                f"got {sorted(rec)}"
            )
    for it in items:
        if not it["prompt"].strip():
            raise EvalError(f"prompt id {it['id']} ({it['lang']}): empty prompt")
    if max_per_lang is not None:
        seen: Counter = Counter()
        kept = []
        for it in items:
            if seen[it["lang"]] < max_per_lang:
                seen[it["lang"]] += 1
                kept.append(it)
        items = kept
    if not items:
        raise EvalError("no evaluation prompts: the prompt list is empty")
    return items


def load_eval_prompts(cfg: RunConfig) -> list[dict]:
    """The first eval.max_prompts rows of the text-level dataset's "eval" split
    (`clo_fast.data.load_or_build_text_dataset`: the dataset training saved, or built from cfg.data)."""
    import clo_fast.data as data

    # the saved dataset when it matches the data config (same split as training), else build and save it
    build = getattr(data, "load_or_build_text_dataset", None) or data.build_text_dataset
    dsd, _summary = build(cfg.data)
    if "eval" not in dsd or len(dsd["eval"]) == 0:
        raise EvalError(
            f"no evaluation prompts: the text dataset from data.source={cfg.data.source!r} has an empty 'eval' split "
            f"(data.eval_fraction={cfg.data.eval_fraction}); raise data.eval_fraction or pass --prompts FILE.jsonl"
        )
    n = min(len(dsd["eval"]), cfg.eval.max_prompts)
    return [dict(r) for r in dsd["eval"].select(range(n))]


def read_prompts_file(path: str | Path) -> list[dict]:
    """A .jsonl (one record per line) or .json (a list of records) file of prompt records."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise EvalError(f"prompts file not found: {path}")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, list):
                raise EvalError(f"{path}: expected a JSON list of prompt records")
            return data
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise EvalError(f"{path}: not valid JSON: {e}") from None


# -------------------------------------------------------------------------------- model and tokens
def _looks_local(path: str) -> bool:
    return (
        path.startswith(("/", "./", "../", "~", ".\\"))
        or path.endswith(("/", os.sep))
        or path.count("/") >= 2
        or os.sep != "/" and os.sep in path
    )


def load_model(path: str, cfg: RunConfig, device: torch.device | None = None):
    """(model, tokenizer) from a local HF directory, a hub name or `demo`; errors name the path.

    The tokenizer gets a pad token (EOS when it has none). Model in eval mode, `cfg.model.dtype`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    if path == "demo":  # the tiny demo model (built offline and cached, as training resolves it)
        from clo_fast.model import resolve_model_path

        path = resolve_model_path(path, cfg.data.cache_dir)
    local = os.path.expanduser(path)
    if os.path.exists(local):
        if not os.path.isdir(local):
            raise EvalError(f"model path {path!r} is a file, expected a Hugging Face model directory")
        if not os.access(local, os.R_OK | os.X_OK):
            raise EvalError(f"model path {path!r} is not readable (permissions)")
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise EvalError(f"model path {path!r} has no config.json: not a Hugging Face model directory")
        src = local
    elif _looks_local(path):
        raise EvalError(f"model path {path!r} does not exist")
    else:
        src = path  # hub name
    dtype = getattr(torch, cfg.model.dtype)
    where = "" if src == local else " (no such local directory; tried as a hub name)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
    except Exception as e:
        raise EvalError(f"cannot load the tokenizer of model {path!r}{where}: {type(e).__name__}: {e}") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
    except Exception as e:
        raise EvalError(f"cannot load model {path!r}{where}: {type(e).__name__}: {e}") from e
    prepare_tokenizer(tokenizer)
    return model.to(device).eval(), tokenizer


def prepare_tokenizer(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise EvalError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def format_prompt(tokenizer, text: str, data_cfg) -> str:
    """The prompt string exactly as training formats it (`clo_fast.data.format_prompt`):
    template=plain: data.prompt_template; template=chat: the tokenizer's chat template."""
    from clo_fast.data import format_prompt as data_format_prompt

    return data_format_prompt(text, tokenizer, data_cfg)


def encode_prompt(tokenizer, text: str, data_cfg) -> list[int]:
    """Prompt token ids as `clo_fast.data.tokenize_dataset` builds them: template=plain gets the tokenizer's
    special prefix (BOS) before the text; a chat template writes its own, so nothing is added there."""
    from clo_fast.data import special_prefix

    prefix = special_prefix(tokenizer) if data_cfg.template == "plain" else []
    return prefix + list(tokenizer(format_prompt(tokenizer, text, data_cfg), add_special_tokens=False)["input_ids"])


def tokenizer_fingerprint(tokenizer) -> str:
    """Short hash of the tokenizer (vocabulary, merges, special tokens): NLL per token compares only within one."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    extra = repr((tokenizer.eos_token_id, tokenizer.bos_token_id, getattr(tokenizer, "chat_template", None)))
    return hashlib.sha256((body + extra).encode()).hexdigest()[:12]


def _eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]) + [tokenizer.eos_token_id]:
        if e is not None:
            ids.add(int(e))
    return sorted(ids)


@torch.inference_mode()
def generate_responses(model, tokenizer, prompt_ids: Sequence[list[int]], *, max_new_tokens: int, batch_size: int) -> list[dict]:
    """Batched greedy decoding. Prompts are left-padded (with an attention mask) and batched by length.

    Returns, per prompt in input order, `{"text", "tokens", "finished"}`: decoded response (special
    tokens skipped), generated tokens before the first EOS, and whether an EOS was produced.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    eos = _eos_ids(model, tokenizer)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    out: list[dict | None] = [None] * len(prompt_ids)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompt_ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            p = prompt_ids[i]
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None,
            pad_token_id=pad, eos_token_id=eos or None,
        )
        new = gen[:, width:].cpu().tolist()
        for r, i in enumerate(idx):
            toks = new[r]
            stop = next((t for t, tok in enumerate(toks) if tok in eos), None)
            kept = toks if stop is None else toks[:stop]
            out[i] = {"text": tokenizer.decode(kept, skip_special_tokens=True).strip(), "tokens": len(kept),
                      "finished": stop is not None}
    return out  # type: ignore[return-value]


def build_reference_batch(examples: Sequence[tuple[list[int], list[int]]], pad_token_id: int) -> dict:
    """Right-padded teacher-forcing batch from (prompt_ids, response_ids) pairs.

    `labels` are shifted (position t holds the token that position t predicts, input_ids[t+1], where
    that token is a response token; IGNORE_INDEX elsewhere), as `clo_fast.ops` expects.
    """
    width = max(len(p) + len(r) for p, r in examples)
    n = len(examples)
    ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for b, (p, r) in enumerate(examples):
        seq = list(p) + list(r)
        ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[b, :len(seq)] = 1
        labels[b, len(p) - 1:len(seq) - 1] = torch.tensor(r, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sequence_logprob_sums(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[S] fp32 sums of log p(labels) under softmax(hidden @ weightᵀ); IGNORE_INDEX positions add 0.

    `clo_fast.ops.sequence_logprobs`: fused on CUDA, chunked torch on CPU (never materialises [S,T,V]).
    """
    from clo_fast.ops import sequence_logprobs

    # never the Triton *interpreter* here (TRITON_INTERPRET=1 in a test session): it is for kernel tests
    impl = "auto" if hidden.is_cuda else "torch"
    return sequence_logprobs(hidden, weight, labels, ignore_index=IGNORE_INDEX, impl=impl).float()


def _plain_head(model) -> bool:
    """True when logits == last hidden @ lm_head.weightᵀ (no bias, soft-capping or scaling)."""
    c = model.config
    head = model.get_output_embeddings()
    return (
        model.base_model is not model
        and isinstance(head, torch.nn.Linear) and head.bias is None
        and getattr(c, "final_logit_softcapping", None) is None
        and getattr(c, "logit_scale", None) in (None, 1, 1.0)
        and getattr(c, "logits_scaling", None) in (None, 1, 1.0)
    )


@torch.inference_mode()
def reference_nll(model, tokenizer, examples: Sequence[tuple[list[int], list[int]]], *, batch_size: int) -> tuple[float, int]:
    """Teacher-forced NLL of responses given prompts: (sum of -log p over response tokens, token count).

    `examples` are (prompt_ids, response_ids) with the closing EOS already in response_ids.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    plain = _plain_head(model)
    for s in range(0, len(examples), batch_size):
        batch = build_reference_batch(examples[s:s + batch_size], tokenizer.pad_token_id)
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        if plain:
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            sums = sequence_logprob_sums(hidden, model.get_output_embeddings().weight, labels)
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            safe = labels.clamp_min(0)
            lp = F.log_softmax(logits, -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            sums = (lp * (labels != IGNORE_INDEX)).sum(1)
        total += -float(sums.double().sum())
        count += int((labels != IGNORE_INDEX).sum())
    return total, count


def reference_examples(tokenizer, items: Sequence[dict], data_cfg) -> list[tuple[list[int], list[int]] | None]:
    """(prompt_ids, response_ids + EOS) per item, truncated to data.max_length; None without a reference."""
    out = []
    eos = tokenizer.eos_token_id
    for it in items:
        if it.get("reference") is None:
            out.append(None)
            continue
        p = encode_prompt(tokenizer, it["prompt"], data_cfg)
        r = list(tokenizer(it["reference"], add_special_tokens=False)["input_ids"])
        if eos is not None:
            r = r + [eos]
        room = data_cfg.max_length - len(p)
        out.append((p, r[:room]) if room >= 1 and r else None)
    return out


# ------------------------------------------------------------------------------------------- judge
JUDGE_SYSTEM = (
    "You compare two answers to the same user instruction. Judge helpfulness, correctness and whether the "
    "answer is written in the language of the instruction. Ignore the order in which the answers appear and "
    "their length as such. End your reply with one line 'Verdict: A', 'Verdict: B' or 'Verdict: TIE'."
)


def judge_url(endpoint: str) -> str:
    """`http://host/v1` -> `http://host/v1/chat/completions` (a full .../chat/completions URL is kept)."""
    e = endpoint.rstrip("/")
    return e if e.endswith("/chat/completions") else e + "/chat/completions"


def build_judge_request(instruction: str, answer_a: str, answer_b: str, model: str | None) -> dict:
    """The OpenAI chat-completions payload asking which of two answers is better."""
    user = (f"# Instruction\n{instruction}\n\n# Answer A\n{answer_a}\n\n# Answer B\n{answer_b}\n\n"
            "Which answer is better? End with 'Verdict: A', 'Verdict: B' or 'Verdict: TIE'.")
    payload = {"messages": [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}],
               "temperature": 0, "max_tokens": 512}
    if model:
        payload["model"] = model
    return payload


_VERDICT = re.compile(r"verdict[\s:：*()\[\]\"'`]{1,8}(A|B|TIE)\b", re.IGNORECASE)


def parse_verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' from a judge reply (the last 'Verdict: X'; or a bare 'A'/'B'/'tie'); None if unclear."""
    if not isinstance(text, str):
        return None
    found = _VERDICT.findall(text)
    if found:
        v = found[-1].upper()
    else:
        bare = re.sub(r"[\s\.\*\(\)\[\]\"'`]|answer|output", "", text, flags=re.IGNORECASE).upper()
        if bare not in ("A", "B", "TIE"):
            return None
        v = bare
    return "tie" if v == "TIE" else v


def http_judge(endpoint: str, api_key: str | None = None, timeout: float = 60.0) -> Callable[[dict], str]:
    """A `send(payload) -> reply text` function that POSTs to an OpenAI-compatible endpoint (urllib)."""
    url = judge_url(endpoint)

    def send(payload: dict) -> str:
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        req = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"), headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = json.loads(resp.read().decode("utf-8"))
        try:
            return body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"unexpected judge reply from {url}: {str(body)[:300]}") from None

    return send


def judge_pairwise(instructions: Sequence[str], candidate: Sequence[str], baseline: Sequence[str],
                   send: Callable[[dict], str], model: str | None = None, seed: int = 0) -> dict:
    """Pairwise win rate of `candidate` over `baseline` answers (AlpacaEval-style, ties count half).

    The candidate is shown as A or B at random (seeded) against position bias. Failed requests and
    unparsable verdicts are counted, never guessed; win_rate is over the decided comparisons only.
    """
    if not (len(instructions) == len(candidate) == len(baseline)):
        raise ValueError("judge_pairwise: instructions, candidate and baseline must have the same length")
    rng = random.Random(seed)
    wins = losses = ties = invalid = errors = 0
    first_error = None
    for ins, cand, base in zip(instructions, candidate, baseline):
        cand_first = rng.random() < 0.5
        a, b = (cand, base) if cand_first else (base, cand)
        try:
            verdict = parse_verdict(send(build_judge_request(ins, a, b, model)))
        except (OSError, urllib.error.URLError, RuntimeError, ValueError) as e:
            errors += 1
            first_error = first_error or f"{type(e).__name__}: {e}"
            continue
        if verdict is None:
            invalid += 1
        elif verdict == "tie":
            ties += 1
        elif (verdict == "A") == cand_first:
            wins += 1
        else:
            losses += 1
    decided = wins + losses + ties
    return {"win_rate": (wins + 0.5 * ties) / decided if decided else None, "wins": wins, "losses": losses,
            "ties": ties, "invalid": invalid, "errors": errors, "n": len(instructions),
            **({"first_error": first_error} if first_error else {})}


# ------------------------------------------------------------------------------------------ report
def _parse_model_specs(model_paths) -> list[tuple[str, Any]]:
    """[(label, path-or-(model, tokenizer))] from 'path', 'label=path', (label, x) or {label: x}."""
    if isinstance(model_paths, (str, os.PathLike)):
        model_paths = [model_paths]
    if isinstance(model_paths, dict):
        model_paths = list(model_paths.items())
    specs = []
    for m in model_paths:
        if isinstance(m, tuple):
            label, src = m
        else:
            m = os.fspath(m)
            head, sep, tail = m.partition("=")
            if sep and head and re.fullmatch(r"[\w.\-]+", head) and tail:
                label, src = head, tail
            else:
                label, src = (Path(m.rstrip("/")).name or m), m
        specs.append((str(label), src))
    if not specs:
        raise EvalError("no models to evaluate: pass at least one --model")
    labels = [s[0] for s in specs]
    dup = [l for l, c in Counter(labels).items() if c > 1]
    if dup:
        raise EvalError(f"model label {dup[0]!r} is used twice: name them, e.g. --model base=PATH --model clo=PATH")
    return specs


def _fmt(v, digits=3) -> str:
    return "–" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def render_markdown(report: dict) -> str:
    """Metrics as rows, models as columns."""
    models = list(report["models"])
    langs = report["languages"]
    lines = [f"Evaluation on held-out prompts (target language: {report['target_lang']}; "
             + ", ".join(f"{l}: {report['n_prompts'][l]} prompts" for l in langs) + ")", "",
             "| metric | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]

    def row(name, key, lang, digits=3):
        vals = [report["models"][m]["metrics"][lang].get(key) for m in models]
        lines.append(f"| {name} | " + " | ".join(_fmt(v, digits) for v in vals) + " |")

    for lang in langs:
        row(f"fidelity {lang} (↑)", "fidelity", lang)
    for lang in langs:
        row(f"reference NLL/token {lang} (↓)", "nll_per_token", lang)
    for lang in langs:
        row(f"mean response tokens {lang}", "mean_response_tokens", lang, 1)
    judge = report.get("judge", {})
    if judge.get("results"):
        base = judge["baseline"]
        for lang in langs:
            vals = [judge["results"].get(m, {}).get(lang, {}).get("win_rate") if m != base else None for m in models]
            lines.append(f"| judge win rate vs {base}, {lang} (↑) | " + " | ".join(_fmt(v) for v in vals) + " |")
    elif judge.get("skipped"):
        lines += ["", f"LLM judge: skipped ({judge['skipped']})."]
    if not report.get("nll_comparable", True):
        lines += ["", "Note: the models use different tokenizers, so NLL per token is not comparable across them."]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: str | Path) -> bool:
    """PNG with two panels: fidelity and reference NLL/token, one bar group per model. False if no matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install 'clo-fast[eval]')")
        return False
    models = list(report["models"])
    langs = report["languages"]
    fig = Figure(figsize=(max(6.5, 1.4 * len(models) + 4), 4.0), dpi=120)
    axes = fig.subplots(1, 2)
    width = min(0.35, 0.8 / max(1, len(langs)))
    for ax, key, title, fmt in ((axes[0], "fidelity", "language fidelity (↑)", "%.2f"),
                                (axes[1], "nll_per_token", "reference NLL / token (↓)", "%.2f")):
        top = 0.0
        for j, lang in enumerate(langs):
            vals = [report["models"][m]["metrics"][lang].get(key) for m in models]
            xs = [i + (j - (len(langs) - 1) / 2) * width for i in range(len(models))]
            bars = ax.bar(xs, [float("nan") if v is None else v for v in vals], width, label=f"{lang} prompts")
            ax.bar_label(bars, fmt=fmt, fontsize=7)
            top = max([top] + [v for v in vals if v is not None])
        ax.set_xticks(range(len(models)))
        ax.set_xticklabels(models, rotation=15 if len(models) > 3 else 0)
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1.1 if key == "fidelity" else max(1e-3, top) * 1.15)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(langs), frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(str(path))
    return True


def write_report(report: dict, generations: list[dict], out_dir: str | Path) -> dict:
    """report.json, report.md, report.png, generations.jsonl under out_dir; returns their paths."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "report.json", "markdown": out / "report.md", "plot": out / "report.png",
             "generations": out / "generations.jsonl"}
    report["files"] = {k: str(v) for k, v in files.items()}
    if not plot_report(report, files["plot"]):
        report["files"].pop("plot")
    files["markdown"].write_text(render_markdown(report), encoding="utf-8")
    with files["generations"].open("w", encoding="utf-8") as f:
        for g in generations:
            f.write(json.dumps(g, ensure_ascii=False) + "\n")
    files["json"].write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
    return report["files"]


# --------------------------------------------------------------------------------------- the driver
def response_metrics(items: Sequence[dict], gens: Sequence[dict], detected: Sequence[str | None]) -> dict:
    """Per prompt language: n_prompts, fidelity, detected-language counts, mean response tokens and the
    share of responses that ended with EOS. `gens[i]` is {"tokens", "finished", ...} for `items[i]`."""
    if not (len(items) == len(gens) == len(detected)):
        raise ValueError("response_metrics: items, gens and detected must have the same length")
    metrics = {}
    for lang in dict.fromkeys(it["lang"] for it in items):
        idx = [i for i, it in enumerate(items) if it["lang"] == lang]
        metrics[lang] = {
            "n_prompts": len(idx),
            "fidelity": language_fidelity([detected[i] for i in idx], lang),
            "detected": dict(Counter(detected[i] or "none" for i in idx).most_common()),
            "mean_response_tokens": sum(gens[i]["tokens"] for i in idx) / len(idx),
            "finished_share": sum(bool(gens[i]["finished"]) for i in idx) / len(idx),
        }
    return metrics


def evaluate_models(cfg: RunConfig, model_paths, prompts: Sequence[dict] | None = None,
                    out_dir: str | Path | None = None, *, judge_send: Callable[[dict], str] | None = None) -> dict:
    """Evaluate models side by side and write the report files. Returns the report dict.

    model_paths: list of 'path', 'label=path' or (label, path) / (label, (model, tokenizer)) — an
      already-loaded pair is used as is (and not freed). Labels default to the path's last component.
    prompts: records as in `normalize_prompts`; default: the "eval" split of the text-level dataset.
    out_dir: default `cfg.eval.output_dir`.
    judge_send: replaces the HTTP call of the LLM judge (tests); the judge runs only when
      `cfg.eval.judge_endpoint` is set or judge_send is given.
    """
    ev = cfg.eval
    check_eval_config(ev)
    target = normalize_lang(cfg.data.target_lang)
    specs = _parse_model_specs(model_paths)
    for _, src in specs:  # fail before any generation when a local path is plainly wrong
        if not isinstance(src, tuple) and _looks_local(str(src)) and not os.path.exists(os.path.expanduser(str(src))):
            raise EvalError(f"model path {str(src)!r} does not exist")
    if (ev.judge_endpoint or judge_send) and ev.judge_baseline and ev.judge_baseline not in [l for l, _ in specs]:
        raise EvalError(f"eval.judge_baseline {ev.judge_baseline!r} is not one of the model labels {[l for l, _ in specs]}")
    records = load_eval_prompts(cfg) if prompts is None else list(prompts)
    if not records:
        raise EvalError("no evaluation prompts: the prompt list is empty")
    items = normalize_prompts(records, target, ev.max_prompts)
    langs = sorted({it["lang"] for it in items}, key=lambda l: (l != "en", l != target, l))
    lid = get_identifier(langs, ev.detector_languages)
    t0 = time.time()

    report: dict = {
        "target_lang": target, "languages": langs, "n_prompts": {l: sum(it["lang"] == l for it in items) for l in langs},
        "eval_config": dataclasses.asdict(ev), "template": cfg.data.template,
        "detector_languages": list(lid.languages), "models": {},
    }
    generations: list[dict] = []
    responses: dict[str, list[str]] = {}
    for label, src in specs:
        t1 = time.time()
        owned = not isinstance(src, tuple)
        if owned:
            model, tokenizer = load_model(str(src), cfg)
        else:
            model, tokenizer = src
            prepare_tokenizer(tokenizer)
            was_training = model.training
            model.eval()
        prompt_ids = [encode_prompt(tokenizer, it["prompt"], cfg.data) for it in items]
        gens = generate_responses(model, tokenizer, prompt_ids, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size)
        detected = lid.detect_batch([g["text"] for g in gens])
        refs = reference_examples(tokenizer, items, cfg.data)
        metrics = response_metrics(items, gens, detected)
        for lang in langs:
            ex = [refs[i] for i, it in enumerate(items) if it["lang"] == lang and refs[i] is not None]
            nll_sum, nll_tok = reference_nll(model, tokenizer, ex, batch_size=ev.batch_size) if ex else (0.0, 0)
            metrics[lang].update(nll_per_token=nll_sum / nll_tok if nll_tok else None, nll_tokens=nll_tok,
                                 nll_sequences=len(ex))
        report["models"][label] = {"path": str(src) if owned else "<in-memory model>", "metrics": metrics,
                                   "tokenizer": tokenizer_fingerprint(tokenizer), "seconds": round(time.time() - t1, 2)}
        responses[label] = [g["text"] for g in gens]
        for it, g, d in zip(items, gens, detected):
            generations.append({"model": label, "id": it["id"], "lang": it["lang"], "prompt": it["prompt"],
                                "response": g["text"], "response_tokens": g["tokens"], "finished": g["finished"],
                                "detected": d})
        print(f"[evaluate] {label}: " + "; ".join(
            f"{l}: fidelity {metrics[l]['fidelity']:.3f}, NLL/tok {_fmt(metrics[l]['nll_per_token'])}" for l in langs)
            + f" ({time.time() - t1:.1f}s)", flush=True)
        if owned:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            model.train(was_training)

    fingerprints = {m["tokenizer"] for m in report["models"].values()}
    report["nll_comparable"] = len(fingerprints) == 1
    if not report["nll_comparable"]:
        print("[evaluate] warning: the models use different tokenizers: NLL per token is not comparable across them")
    report["judge"] = run_judge(cfg, items, responses, langs, send=judge_send)
    report["seconds"] = round(time.time() - t0, 2)
    write_report(report, generations, out_dir if out_dir is not None else ev.output_dir)
    return report


def run_judge(cfg: RunConfig, items: list[dict], responses: dict[str, list[str]], langs: list[str],
              send: Callable[[dict], str] | None = None) -> dict:
    """Win rate of every model against the baseline (eval.judge_baseline, default: the first model)."""
    ev = cfg.eval
    labels = list(responses)
    if send is None and not ev.judge_endpoint:
        msg = "eval.judge_endpoint is not set"
        print(f"[evaluate] LLM judge skipped: {msg}")
        return {"skipped": msg}
    if len(labels) < 2:
        msg = "needs at least two models"
        print(f"[evaluate] LLM judge skipped: {msg}")
        return {"skipped": msg}
    base = ev.judge_baseline or labels[0]
    if base not in responses:
        raise EvalError(f"eval.judge_baseline {base!r} is not one of the model labels {labels}")
    if send is None:
        send = http_judge(ev.judge_endpoint, os.environ.get(ev.judge_api_key_env) if ev.judge_api_key_env else None,
                          ev.judge_timeout_s)
    results: dict = {}
    for label in labels:
        if label == base:
            continue
        results[label] = {}
        for lang in langs:
            idx = [i for i, it in enumerate(items) if it["lang"] == lang]
            results[label][lang] = judge_pairwise([items[i]["prompt"] for i in idx], [responses[label][i] for i in idx],
                                                  [responses[base][i] for i in idx], send, ev.judge_model)
            r = results[label][lang]
            print(f"[evaluate] judge {label} vs {base} ({lang}): win rate {_fmt(r['win_rate'])} "
                  f"(W{r['wins']}/L{r['losses']}/T{r['ties']}, invalid {r['invalid']}, errors {r['errors']})")
    return {"baseline": base, "endpoint": ev.judge_endpoint, "judge_model": ev.judge_model, "results": results}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clo_fast.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="run config YAML (data.* gives prompts/template, eval.* the rest)")
    ap.add_argument("--model", action="append", required=True, metavar="[LABEL=]PATH",
                    help="model directory or hub name; repeat for a side-by-side table (e.g. base=... clo=...)")
    ap.add_argument("--prompts", help="JSON/JSONL prompt records instead of the dataset's eval split")
    ap.add_argument("--out-dir", help="output folder (default eval.output_dir)")
    ap.add_argument("--max-prompts", type=int, help="override eval.max_prompts (per language)")
    ap.add_argument("--max-new-tokens", type=int, help="override eval.max_new_tokens")
    ap.add_argument("--batch-size", type=int, help="override eval.batch_size")
    args = ap.parse_args(argv)
    overrides = {f"eval.{k}": v for k, v in (("max_prompts", args.max_prompts), ("max_new_tokens", args.max_new_tokens),
                                             ("batch_size", args.batch_size)) if v is not None}
    try:
        cfg = load_config(args.config, overrides)
        check_eval_config(cfg.eval, args.config)
        prompts = read_prompts_file(args.prompts) if args.prompts else None
        report = evaluate_models(cfg, args.model, prompts=prompts, out_dir=args.out_dir)
    except (EvalError, ConfigError, UnknownLanguageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(render_markdown(report))
    print("files: " + ", ".join(report["files"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
