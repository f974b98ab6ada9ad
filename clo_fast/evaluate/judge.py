"""Pairwise win rate through an LLM judge (the CLO paper's protocol, AlpacaEval-style), over any OpenAI-compatible
chat-completions endpoint (`eval.judge_endpoint`: a local vLLM or llama.cpp server, or a hosted API).

The protocol, per pair (candidate, baseline) and per prompt language:

- every prompt is answered by both models (greedy, as for fidelity) and judged **twice**, the candidate shown
  first (as A) and then second (as B), so the judge's position bias cancels;
- each judgment scores the candidate 1 (win), 0.5 (tie) or 0 (loss); a prompt's score is the mean over its
  on-format judgments; the **win rate** is the mean prompt score, over the prompts with at least one
  on-format judgment. Off-format replies (no 'Verdict: A|B|TIE') and failed requests are counted and reported
  (`off_format`, `errors`, `unjudged_prompts`), never guessed;
- the **95% interval** is a percentile bootstrap over prompts (each resampled prompt keeps both of its
  judgments: the pairs stay paired), `eval.judge_bootstrap` resamples, seeded;
- the **length-controlled** win rate answers "how often would the candidate win if both answers had the same
  length": a logistic regression of each judgment's score (1 / 0.5 / 0, as fractional targets) on the length
  difference (candidate − baseline answer, in characters, divided by its standard deviation), win rate =
  sigmoid(intercept), i.e. the fitted win rate at zero length difference (a small L2 penalty on the slope,
  LC_RIDGE, keeps it finite when length alone separates wins from losses). This is AlpacaEval 2's
  length-controlled idea reduced to its length term (no per-prompt difficulty term: with one baseline it is
  absorbed into the intercept), fitted our own way; it gets its own bootstrap interval.

Judgments are cached on disk (JSON lines, `eval.judge_cache`, default `<output_dir>/judge_cache.jsonl`), keyed by
a hash of the prompt, the two answers in the order shown, the judge model and the template: a rerun sends nothing
it already asked, and a crash or Ctrl-C loses at most the request in flight. Requests go through httpx, retried
with exponential back-off (tenacity) on 429, 5xx and transport errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from clo_fast.config import RunConfig
from clo_fast.evaluate.errors import EvalError
from clo_fast.evaluate.report import fmt, redact_secrets
from clo_fast.logs import get_logger

log = get_logger("evaluate")

JUDGE_SYSTEM = (
    "You compare two answers to the same user instruction. Judge helpfulness, correctness and whether the "
    "answer is written in the language of the instruction. Ignore the order in which the answers appear and "
    "their length as such. End your reply with one line 'Verdict: A', 'Verdict: B' or 'Verdict: TIE'."
)
JUDGE_USER = (
    "# Instruction\n{instruction}\n\n# Answer A\n{answer_a}\n\n# Answer B\n{answer_b}\n\n"
    "Which answer is better? End with 'Verdict: A', 'Verdict: B' or 'Verdict: TIE'."
)
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})  # worth another try; any other HTTP error is final
SCORES = {"win": 1.0, "tie": 0.5, "loss": 0.0}  # the candidate's score per judgment


def judge_url(endpoint: str) -> str:
    """`http://host/v1` -> `http://host/v1/chat/completions` (a full .../chat/completions URL is kept)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(endpoint)  # a query string (?api-key=...) stays after the path
    path = parts.path.rstrip("/")
    path = path if path.endswith("/chat/completions") else path + "/chat/completions"
    return urlunsplit(parts._replace(path=path))


def build_judge_request(instruction: str, answer_a: str, answer_b: str, model: str | None) -> dict:
    """The OpenAI chat-completions payload asking which of two answers is better."""
    user = JUDGE_USER.format(instruction=instruction, answer_a=answer_a, answer_b=answer_b)
    payload = {
        "messages": [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}],
        "temperature": 0,
        "max_tokens": 512,
    }
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


class JudgeHTTPError(RuntimeError):
    """A judge request that failed for good (after the retries, or with a status not worth retrying)."""


def http_judge(
    endpoint: str,
    api_key: str | None = None,
    timeout: float = 60.0,
    *,
    max_retries: int = 4,
    retry_wait_s: float = 1.0,
) -> Callable[[dict], str]:
    """A `send(payload) -> reply text` function that POSTs to an OpenAI-compatible endpoint through httpx,
    retrying 429 / 5xx / transport errors up to `max_retries` times with exponential back-off (tenacity:
    retry_wait_s, 2×, 4× ... capped at 60 s, with jitter)."""
    import httpx
    from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential, wait_random

    url = judge_url(endpoint)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(timeout=timeout, headers=headers)
    secrets = (api_key or "",)

    def retryable(e: BaseException) -> bool:
        if isinstance(e, httpx.HTTPStatusError):
            return e.response.status_code in RETRY_STATUS
        return isinstance(e, httpx.TransportError)

    retrying = Retrying(
        retry=retry_if_exception(retryable),
        stop=stop_after_attempt(max_retries + 1),
        wait=wait_exponential(multiplier=retry_wait_s, max=60.0) + wait_random(0, retry_wait_s),
        reraise=True,
    )

    def post(payload: dict) -> dict:
        resp = client.post(url, json=payload)
        resp.raise_for_status()
        return resp.json()

    def send(payload: dict) -> str:
        try:
            body = retrying(post, payload)
        except httpx.HTTPStatusError as e:
            text = redact_secrets(e.response.text[:300], secrets)
            raise JudgeHTTPError(f"HTTP {e.response.status_code} from {redact_secrets(url)}: {text}") from None
        except (httpx.HTTPError, ValueError) as e:  # transport errors, invalid JSON
            raise JudgeHTTPError(f"{type(e).__name__} from {redact_secrets(url)}: {e}") from None
        try:
            return body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            # an endpoint may echo the request headers: the key must not reach the report or the log
            reply = redact_secrets(str(body)[:300], secrets)
            raise JudgeHTTPError(f"unexpected judge reply from {redact_secrets(url)}: {reply}") from None

    return send


# ------------------------------------------------------------------------------------------- the cache
def judgment_key(instruction: str, answer_a: str, answer_b: str, judge_model: str | None) -> str:
    """sha256 of everything that decides a judgment: the prompt, both answers in the order shown, the judge
    model and the template (system and user text)."""
    blob = json.dumps([instruction, answer_a, answer_b, judge_model, JUDGE_SYSTEM, JUDGE_USER], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgmentCache:
    """Judge replies on disk, one JSON line per judgment ({"key", "reply"}), appended and flushed as they come;
    a torn last line (a crash mid-write) is ignored on reading. `path=None`: in memory only."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path).expanduser() if path else None
        self.replies: dict[str, str] = {}
        if self.path and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("key"), str) and isinstance(rec.get("reply"), str):
                    self.replies[rec["key"]] = rec["reply"]

    def get(self, key: str) -> str | None:
        return self.replies.get(key)

    def put(self, key: str, reply: str) -> None:
        self.replies[key] = reply
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"key": key, "reply": reply}, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------------ statistics
LC_RIDGE = 1e-2  # L2 penalty on the (standardised) length slope: keeps a fit finite when length separates wins


def _lc_fit(y, x, weights):
    """sigmoid(intercept) of weighted logistic regressions of fractional y on (1, x), one per row of
    `weights` [B, n], by Newton's method (batched: the bootstrap refits thousands of times; a library fit costs
    tens of ms each). Objective: Σ w·logloss + LC_RIDGE/2 · slope²; sklearn's LogisticRegression(C=1/LC_RIDGE)
    minimises the same (the test compares the two)."""
    import numpy as np

    b0 = np.zeros(weights.shape[0])
    b1 = np.zeros(weights.shape[0])
    for _ in range(100):
        p = 1.0 / (1.0 + np.exp(-np.clip(b0[:, None] + b1[:, None] * x, -35, 35)))
        r = weights * (y - p)
        s = weights * p * (1.0 - p)
        g0, g1 = r.sum(1), (r * x).sum(1) - LC_RIDGE * b1
        h00, h01, h11 = s.sum(1), (s * x).sum(1), (s * x * x).sum(1) + LC_RIDGE
        det = np.maximum(h00 * h11 - h01**2, 1e-300)
        d0, d1 = (h11 * g0 - h01 * g1) / det, (h00 * g1 - h01 * g0) / det
        b0, b1 = np.clip(b0 + d0, -35, 35), b1 + d1
        if np.max(np.abs(d0)) < 1e-10 and np.max(np.abs(d1)) < 1e-10:
            break
    return 1.0 / (1.0 + np.exp(-b0))


def _lc_batch(y, x, weights):
    """`_lc_fit` where the weighted scores vary; the plain weighted mean where they are all equal (one class:
    no finite intercept) or the lengths do not vary."""
    import numpy as np

    total = weights.sum(1)
    mean = (weights * y).sum(1) / total
    used = weights > 0
    varies = (np.where(used, y, np.inf).min(1) < np.where(used, y, -np.inf).max(1)) & (
        np.where(used, x, np.inf).min(1) < np.where(used, x, -np.inf).max(1)
    )
    out = mean.copy()
    if varies.any():
        out[varies] = _lc_fit(y, x, weights[varies])
    return out


def length_controlled_win_rate(scores: Sequence[float], length_diffs: Sequence[float]) -> float | None:
    """The fitted win rate at equal lengths: sigmoid(intercept) of a logistic regression of the judgment
    scores (1 / 0.5 / 0, fractional targets) on the length difference standardised by its standard deviation.
    Equal scores everywhere, or no length spread, give the plain mean."""
    import numpy as np

    y = np.asarray(scores, dtype=np.float64)
    x = np.asarray(length_diffs, dtype=np.float64)
    if y.size == 0:
        return None
    sd = x.std()
    return float(_lc_batch(y, x / (sd if sd > 0 else 1.0), np.ones((1, y.size)))[0])


def summarize_judgments(prompts: list[dict], n_boot: int, seed: int) -> dict:
    """Win rate, counts, bootstrap intervals and the length-controlled figure from per-prompt judgments.

    prompts: one dict per prompt, {"scores": [score per on-format judgment], "off_format", "errors",
    "length_diff": candidate − baseline answer length in characters}. The bootstrap resamples prompts (with
    replacement): a resample weights each prompt's judgments by how often the prompt was drawn."""
    import numpy as np

    judged = [p for p in prompts if p["scores"]]
    y = np.array([s for p in judged for s in p["scores"]], dtype=np.float64)
    x = np.array([p["length_diff"] for p in judged for _ in p["scores"]], dtype=np.float64)
    owner = np.array([i for i, p in enumerate(judged) for _ in p["scores"]], dtype=np.int64)
    out = {
        "n_prompts": len(prompts),
        "judged_prompts": len(judged),
        "unjudged_prompts": len(prompts) - len(judged),
        "judgments": int(y.size),
        "wins": int((y == 1.0).sum()),
        "ties": int((y == 0.5).sum()),
        "losses": int((y == 0.0).sum()),
        "off_format": sum(p["off_format"] for p in prompts),
        "errors": sum(p["errors"] for p in prompts),
        "order_agreement": None,
        "win_rate": None,
        "win_rate_ci95": None,
        "lc_win_rate": None,
        "lc_win_rate_ci95": None,
        "bootstrap": n_boot,
    }
    if not judged:
        return out
    both = [p for p in judged if len(p["scores"]) == 2]
    out["order_agreement"] = sum(p["scores"][0] == p["scores"][1] for p in both) / len(both) if both else None
    prompt_scores = np.array([np.mean(p["scores"]) for p in judged])
    out["win_rate"] = float(prompt_scores.mean())
    out["lc_win_rate"] = length_controlled_win_rate(y, x)
    if n_boot > 0 and len(judged) > 1:
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(len(judged), np.full(len(judged), 1.0 / len(judged)), size=n_boot)  # [B, prompts]
        raw = counts @ prompt_scores / len(judged)
        sd = x.std()
        lc = _lc_batch(y, x / (sd if sd > 0 else 1.0), counts[:, owner].astype(np.float64))
        out["win_rate_ci95"] = [float(np.quantile(raw, 0.025)), float(np.quantile(raw, 0.975))]
        out["lc_win_rate_ci95"] = [float(np.quantile(lc, 0.025)), float(np.quantile(lc, 0.975))]
    return out


# ------------------------------------------------------------------------------------------- judging
def judge_pairwise(
    instructions: Sequence[str],
    candidate: Sequence[str],
    baseline: Sequence[str],
    send: Callable[[dict], str],
    model: str | None = None,
    *,
    cache: JudgmentCache | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Win rate of `candidate` over `baseline` answers: every prompt judged in both orders (see the module
    docstring). `send` failures (JudgeHTTPError, OSError, ValueError) count as errors for that judgment."""
    if not (len(instructions) == len(candidate) == len(baseline)):
        raise ValueError("judge_pairwise: instructions, candidate and baseline must have the same length")
    cache = cache if cache is not None else JudgmentCache(None)
    prompts, first_error, cached = [], None, 0
    for ins, cand, base in zip(instructions, candidate, baseline, strict=True):
        rec = {"scores": [], "off_format": 0, "errors": 0, "length_diff": float(len(cand) - len(base))}
        for cand_first in (True, False):
            a, b = (cand, base) if cand_first else (base, cand)
            key = judgment_key(ins, a, b, model)
            reply = cache.get(key)
            if reply is None:
                try:
                    reply = send(build_judge_request(ins, a, b, model))
                except (JudgeHTTPError, OSError, ValueError) as e:
                    rec["errors"] += 1
                    first_error = first_error or redact_secrets(f"{type(e).__name__}: {e}")
                    continue
                cache.put(key, reply)
            else:
                cached += 1
            verdict = parse_verdict(reply)
            if verdict is None:
                rec["off_format"] += 1
            elif verdict == "tie":
                rec["scores"].append(SCORES["tie"])
            else:
                rec["scores"].append(SCORES["win"] if (verdict == "A") == cand_first else SCORES["loss"])
        prompts.append(rec)
    out = summarize_judgments(prompts, n_boot, seed)
    out["from_cache"] = cached
    if first_error:
        out["first_error"] = first_error
    return out


def judge_pairs(cfg: RunConfig, labels: Sequence[str]) -> list[tuple[str, str]]:
    """(candidate, baseline) label pairs: every other model against eval.judge_baseline (default: the first)."""
    base = cfg.eval.judge_baseline or labels[0]
    if base not in labels:
        raise EvalError(f"eval.judge_baseline {base!r} is not one of the model labels {list(labels)}")
    return [(label, base) for label in labels if label != base]


def make_send(cfg: RunConfig) -> Callable[[dict], str]:
    ev = cfg.eval
    return http_judge(
        ev.judge_endpoint,
        os.environ.get(ev.judge_api_key_env) if ev.judge_api_key_env else None,
        ev.judge_timeout_s,
        max_retries=ev.judge_max_retries,
        retry_wait_s=ev.judge_retry_wait_s,
    )


def check_judge_reachable(cfg: RunConfig, send: Callable[[dict], str]) -> None:
    """One tiny request before any generation: an unreachable endpoint, a wrong key or an unknown judge model
    fails here, naming eval.judge_endpoint, instead of after every model has generated."""
    payload = {"messages": [{"role": "user", "content": "Reply with OK."}], "max_tokens": 1, "temperature": 0}
    if cfg.eval.judge_model:
        payload["model"] = cfg.eval.judge_model
    try:
        send(payload)
    except (JudgeHTTPError, OSError, ValueError) as e:
        where = redact_secrets(cfg.eval.judge_endpoint or "")
        raise EvalError(
            f"eval.judge_endpoint {where!r} (judge model {cfg.eval.judge_model!r}) did not answer a test request: "
            f"{redact_secrets(str(e))}"
        ) from None


def judge_cache_path(cfg: RunConfig, out_dir: str | Path) -> Path:
    return Path(cfg.eval.judge_cache).expanduser() if cfg.eval.judge_cache else Path(out_dir) / "judge_cache.jsonl"


def run_judge(
    cfg: RunConfig,
    items: list[dict],
    responses: dict[str, list[str]],
    langs: list[str],
    send: Callable[[dict], str] | None = None,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    cache_path: str | Path | None = None,
) -> dict:
    """Win rate of each (candidate, baseline) pair per language (default pairs: every model against
    eval.judge_baseline); `send=None` builds the HTTP client from eval.judge_*."""
    ev = cfg.eval
    labels = list(responses)
    if send is None and not ev.judge_endpoint:
        msg = "eval.judge_endpoint is not set"
        log.info(f"LLM judge skipped: {msg}")
        return {"skipped": msg}
    if len(labels) < 2:
        msg = "needs at least two models"
        log.info(f"LLM judge skipped: {msg}")
        return {"skipped": msg}
    pairs = list(pairs) if pairs is not None else judge_pairs(cfg, labels)
    send = send or make_send(cfg)
    cache = JudgmentCache(cache_path)
    results: dict = {}
    for cand, base in pairs:
        results.setdefault(cand, {}).setdefault(base, {})
        for lang in langs:
            idx = [i for i, it in enumerate(items) if it["lang"] == lang]
            r = judge_pairwise(
                [items[i]["prompt"] for i in idx],
                [responses[cand][i] for i in idx],
                [responses[base][i] for i in idx],
                send,
                ev.judge_model,
                cache=cache,
                n_boot=ev.judge_bootstrap,
                seed=ev.judge_seed,
            )
            results[cand][base][lang] = r
            ci = r["win_rate_ci95"]
            log.info(
                f"judge {cand} vs {base} ({lang}): win rate {fmt(r['win_rate'])}"
                + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
                + f", length-controlled {fmt(r['lc_win_rate'])} (W{r['wins']}/T{r['ties']}/L{r['losses']} "
                f"judgments; off-format {r['off_format']}, errors {r['errors']}, cached {r['from_cache']})"
            )
    return {
        "pairs": [list(p) for p in pairs],
        "endpoint": redact_secrets(ev.judge_endpoint or "<in-process>"),
        "judge_model": ev.judge_model,
        "cache": str(cache_path) if cache_path else None,
        "results": results,
    }
