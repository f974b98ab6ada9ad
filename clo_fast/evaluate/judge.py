"""The optional LLM judge: pairwise win rates through an OpenAI-compatible chat-completions endpoint."""

from __future__ import annotations

import json
import os
import random
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from clo_fast.config import RunConfig
from clo_fast.evaluate.errors import EvalError
from clo_fast.evaluate.report import fmt, redact_secrets

JUDGE_SYSTEM = (
    "You compare two answers to the same user instruction. Judge helpfulness, correctness and whether the "
    "answer is written in the language of the instruction. Ignore the order in which the answers appear and "
    "their length as such. End your reply with one line 'Verdict: A', 'Verdict: B' or 'Verdict: TIE'."
)


def judge_url(endpoint: str) -> str:
    """`http://host/v1` -> `http://host/v1/chat/completions` (a full .../chat/completions URL is kept)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(endpoint)  # a query string (?api-key=...) stays after the path
    path = parts.path.rstrip("/")
    path = path if path.endswith("/chat/completions") else path + "/chat/completions"
    return urlunsplit(parts._replace(path=path))


def build_judge_request(instruction: str, answer_a: str, answer_b: str, model: str | None) -> dict:
    """The OpenAI chat-completions payload asking which of two answers is better."""
    user = (
        f"# Instruction\n{instruction}\n\n# Answer A\n{answer_a}\n\n# Answer B\n{answer_b}\n\n"
        "Which answer is better? End with 'Verdict: A', 'Verdict: B' or 'Verdict: TIE'."
    )
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
            # an endpoint may echo the request headers: the key must not reach the report or the log
            reply = redact_secrets(str(body)[:300], (api_key or "",))
            raise RuntimeError(f"unexpected judge reply from {redact_secrets(url)}: {reply}") from None

    return send


def judge_pairwise(
    instructions: Sequence[str],
    candidate: Sequence[str],
    baseline: Sequence[str],
    send: Callable[[dict], str],
    model: str | None = None,
    seed: int = 0,
) -> dict:
    """Pairwise win rate of `candidate` over `baseline` answers (AlpacaEval-style, ties count half).

    The candidate is shown as A or B at random (seeded) against position bias. Failed requests and
    unparsable verdicts are counted, never guessed; win_rate is over the decided comparisons only.
    """
    if not (len(instructions) == len(candidate) == len(baseline)):
        raise ValueError("judge_pairwise: instructions, candidate and baseline must have the same length")
    rng = random.Random(seed)
    wins = losses = ties = invalid = errors = 0
    first_error = None
    for ins, cand, base in zip(instructions, candidate, baseline, strict=False):
        cand_first = rng.random() < 0.5
        a, b = (cand, base) if cand_first else (base, cand)
        try:
            verdict = parse_verdict(send(build_judge_request(ins, a, b, model)))
        except (OSError, urllib.error.URLError, RuntimeError, ValueError) as e:
            errors += 1
            first_error = first_error or redact_secrets(f"{type(e).__name__}: {e}")
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
    return {
        "win_rate": (wins + 0.5 * ties) / decided if decided else None,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "invalid": invalid,
        "errors": errors,
        "n": len(instructions),
        **({"first_error": first_error} if first_error else {}),
    }


def run_judge(
    cfg: RunConfig,
    items: list[dict],
    responses: dict[str, list[str]],
    langs: list[str],
    send: Callable[[dict], str] | None = None,
) -> dict:
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
        send = http_judge(
            ev.judge_endpoint,
            os.environ.get(ev.judge_api_key_env) if ev.judge_api_key_env else None,
            ev.judge_timeout_s,
        )
    results: dict = {}
    for label in labels:
        if label == base:
            continue
        results[label] = {}
        for lang in langs:
            idx = [i for i, it in enumerate(items) if it["lang"] == lang]
            results[label][lang] = judge_pairwise(
                [items[i]["prompt"] for i in idx],
                [responses[label][i] for i in idx],
                [responses[base][i] for i in idx],
                send,
                ev.judge_model,
            )
            r = results[label][lang]
            print(
                f"[evaluate] judge {label} vs {base} ({lang}): win rate {fmt(r['win_rate'])} "
                f"(W{r['wins']}/L{r['losses']}/T{r['ties']}, invalid {r['invalid']}, errors {r['errors']})"
            )
    endpoint = redact_secrets(ev.judge_endpoint)
    return {"baseline": base, "endpoint": endpoint, "judge_model": ev.judge_model, "results": results}
