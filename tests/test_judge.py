"""The LLM judge against a fake OpenAI-compatible server on 127.0.0.1 (offline): both orders, ties, an off-format
reply, a 429 then success, the disk cache, the bootstrap interval and the length-controlled win rate."""

import os

from clo_fast.config import to_dict

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from clo_fast.config import RunConfig
from clo_fast.evaluate import judge as J
from clo_fast.evaluate.errors import EvalError

ANSWER = re.compile(r"# Answer A\n(.*?)\n\n# Answer B\n(.*?)\n\nWhich answer", re.S)


class FakeJudge:
    """A deterministic judge: prefers the answer that starts with GOOD, else a non-empty one over an empty one,
    else B; for an instruction containing
    'tie' says TIE; for 'bias' always says A; for 'broken' answers 500; for 'offformat' rambles without a verdict
    when the first answer is
    GOOD; for 'busy' answers 429 to the first request of that instruction. Counts the requests it received."""

    def __init__(self):
        self.requests = []
        self.auth = []
        self.busy_seen = 0
        self.lock = threading.Lock()

    def reply(self, payload: dict) -> tuple[int, dict]:
        user = payload["messages"][-1]["content"]
        with self.lock:
            self.requests.append(payload)
        if user == "Reply with OK.":
            return 200, _completion("OK")
        a, b = ANSWER.search(user).groups()
        instruction = user.split("\n\n# Answer A\n")[0]  # the keywords below are looked for here only
        if "broken" in instruction:  # the probe passed, every judgment fails
            return 500, {"error": {"message": "judge crashed"}}
        if "busy" in instruction:
            with self.lock:
                self.busy_seen += 1
                first = self.busy_seen == 1
            if first:
                return 429, {"error": {"message": "rate limited"}}
        if "tie" in instruction:
            return 200, _completion("Both are equally good.\nVerdict: TIE")
        if "bias" in instruction:
            return 200, _completion("Verdict: A")
        if "offformat" in instruction and a.startswith("GOOD"):
            return 200, _completion("I like both of them, honestly.")
        prefers_a = a.startswith("GOOD") or (bool(a) and not b)
        return 200, _completion("Reasoning...\nVerdict: " + ("A" if prefers_a else "B"))


def _completion(text: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


@pytest.fixture()
def server():
    judge = FakeJudge()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            judge.auth.append(self.headers.get("Authorization"))
            if self.path == "/v1/chat/completions":
                status, reply = judge.reply(body)
            else:
                status, reply = 500, {"error": f"no route {self.path}"}
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    judge.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield judge
    httpd.shutdown()
    httpd.server_close()


# the five prompts and the candidate's expected scores (candidate shown first, then second)
CASES = [
    ("q1 win", "GOOD answer one", "meh one", [1.0, 1.0]),
    ("q2 tie", "GOOD answer two", "meh two", [0.5, 0.5]),
    ("q3 bias", "GOOD answer three", "meh three", [1.0, 0.0]),  # "A" both times: a win, then a loss
    ("q4 offformat", "GOOD answer four", "meh four", [1.0]),  # first order off-format, not guessed
    ("q5 busy", "meh five", "GOOD answer five", [0.0, 0.0]),  # 429 once, then the baseline wins both orders
]


def make_cfg(url: str, tmp_path, **kw) -> RunConfig:
    cfg = RunConfig()
    cfg.eval.judge_endpoint = url
    cfg.eval.judge_model = "fake-judge"
    cfg.eval.judge_retry_wait_s = 0.01
    cfg.eval.judge_cache = str(tmp_path / "judge_cache.jsonl")
    for k, v in kw.items():
        setattr(cfg.eval, k, v)
    return cfg


def test_win_rate_against_fake_server_by_hand(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "k123")  # eval.judge_api_key_env's default
    cfg = make_cfg(server.url, tmp_path)
    send = J.make_send(cfg)
    J.check_judge_reachable(cfg, send)
    ins, cand, base, expected = (list(x) for x in zip(*CASES, strict=True))
    cache = J.JudgmentCache(cfg.eval.judge_cache)
    r = J.judge_pairwise(ins, cand, base, send, "fake-judge", cache=cache, n_boot=2000, seed=0)

    prompt_scores = [sum(s) / len(s) for s in expected]  # 1, .5, .5, 1, 0
    assert r["win_rate"] == pytest.approx(sum(prompt_scores) / 5) == pytest.approx(0.6)
    assert (r["wins"], r["ties"], r["losses"]) == (4, 2, 3)
    assert (r["judgments"], r["off_format"], r["errors"]) == (9, 1, 0)
    assert (r["judged_prompts"], r["unjudged_prompts"], r["n_prompts"]) == (5, 0, 5)
    assert r["order_agreement"] == pytest.approx(3 / 4)  # q3 disagrees; q4 has one on-format judgment
    # 1 check + 10 judgments + 1 retried 429; every request asked for the configured judge model
    assert len(server.requests) == 12 and server.busy_seen == 3
    assert all(p.get("model") == "fake-judge" for p in server.requests)
    assert set(server.auth) == {"Bearer k123"}
    shown = [ANSWER.search(p["messages"][-1]["content"]).groups() for p in server.requests[1:]]
    assert ("GOOD answer one", "meh one") in shown and ("meh one", "GOOD answer one") in shown  # both orders

    # the percentile bootstrap over prompts, recomputed independently (another RNG, many resamples)
    rng = random.Random(1)
    boot = sorted(sum(rng.choices(prompt_scores, k=5)) / 5 for _ in range(20000))
    lo, hi = boot[int(0.025 * 20000)], boot[int(0.975 * 20000)]
    assert r["win_rate_ci95"][0] == pytest.approx(lo, abs=0.11) and r["win_rate_ci95"][1] == pytest.approx(hi, abs=0.11)
    assert r["win_rate_ci95"][0] < r["win_rate"] < r["win_rate_ci95"][1]

    # a rerun costs nothing: every judgment comes from the disk cache
    n = len(server.requests)
    again = J.judge_pairwise(ins, cand, base, send, "fake-judge", cache=J.JudgmentCache(cfg.eval.judge_cache))
    assert len(server.requests) == n and again["from_cache"] == 10 and again["win_rate"] == r["win_rate"]
    # ... keyed by the judge model too: another judge is asked again
    J.judge_pairwise(ins[:1], cand[:1], base[:1], send, "other-judge", cache=J.JudgmentCache(cfg.eval.judge_cache))
    assert len(server.requests) == n + 2
    # a torn last line (a crash mid-write) is skipped, the rest kept
    with open(cfg.eval.judge_cache, "a") as f:
        f.write('{"key": "abc", "rep')
    assert len(J.JudgmentCache(cfg.eval.judge_cache).replies) == 12


def test_failed_requests_are_counted_not_guessed(server, tmp_path):
    cfg = make_cfg(server.url + "/nowhere", tmp_path, judge_max_retries=1)  # the server answers 500 there
    send = J.make_send(cfg)
    r = J.judge_pairwise(["q"], ["GOOD"], ["meh"], send, None, n_boot=10)
    assert r["win_rate"] is None and r["errors"] == 2 and r["unjudged_prompts"] == 1
    assert "HTTP 500" in r["first_error"]
    assert len(server.requests) == 0  # the handler rejected the path before judging


def test_unreachable_judge_fails_before_any_model_loads(tmp_path, monkeypatch):
    import socket

    import clo_fast.evaluate.run as run

    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = make_cfg(f"http://127.0.0.1:{port}/v1", tmp_path, judge_max_retries=1)
    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    prompts = [{"prompt": "hi", "lang": "en"}]
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "tokenizer.json").write_text("{}")
    with pytest.raises(EvalError, match=r"eval\.judge_endpoint .*127\.0\.0\.1.*did not answer"):
        run.evaluate_models(cfg, [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"], prompts=prompts)


def test_model_folder_without_tokenizer_fails_first(tmp_path, monkeypatch):
    import clo_fast.evaluate.run as run

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(EvalError, match=r"model 'sft' .*--versus.*no tokenizer"):
        run.evaluate_models(RunConfig(), [f"sft={tmp_path / 'm'}"], prompts=[{"prompt": "hi", "lang": "en"}])


def sklearn_reference(y, x):
    """The same penalised logistic regression through scikit-learn (fractional targets as two weighted rows)."""
    from sklearn.linear_model import LogisticRegression

    feats = np.concatenate([x, x])[:, None] / x.std()
    labels = np.concatenate([np.ones_like(y), np.zeros_like(y)])
    weights = np.concatenate([y, 1 - y])
    keep = weights > 0
    fit = LogisticRegression(C=1 / J.LC_RIDGE, tol=1e-10, max_iter=10000)
    fit.fit(feats[keep], labels[keep], sample_weight=weights[keep])
    return 1 / (1 + np.exp(-fit.intercept_[0]))


def test_length_controlled_win_rate_matches_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.normal(0, 50, size=60)
        p = 1 / (1 + np.exp(-(0.3 + 0.02 * x)))
        y = np.where(rng.random(60) < 0.1, 0.5, (rng.random(60) < p).astype(float))  # ties too
        assert J.length_controlled_win_rate(y, x) == pytest.approx(sklearn_reference(y, x), abs=1e-5)
    # a judge that rewards length: the candidate wins when it is longer, and it is mostly longer
    x = np.concatenate([rng.uniform(10, 100, 40), rng.uniform(-100, -10, 10)])
    y = np.where(rng.random(50) < 0.8, (x > 0).astype(float), 0.5)
    lc = J.length_controlled_win_rate(y, x)
    assert lc == pytest.approx(sklearn_reference(y, x), abs=1e-4) and lc < y.mean() - 0.1
    assert J.length_controlled_win_rate([1.0, 1.0, 1.0], [5, 6, 7]) == 1.0  # one class: the plain rate
    assert J.length_controlled_win_rate([1.0, 0.0, 0.5], [5, 5, 5]) == 0.5  # no length spread: the plain rate


def test_evaluate_cli_versus_against_fake_server(server, tmp_path, capsys):
    """--model clo=... --versus sft=...: the mute model (always empty) is judged against the base model."""
    from helpers import ROWS, make_model, make_tokenizer

    from clo_fast.evaluate import cli

    tok = make_tokenizer()
    for name, kw in (("clo", {}), ("sft", {"mute": True})):
        make_model(tok, **kw).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    rows = [{**r, "prompt_en": r["prompt_en"] + " win", "prompt_tgt": r["prompt_tgt"] + " win"} for r in ROWS]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    conf = tmp_path / "run.yaml"
    conf.write_text(
        "data:\n  target_lang: ko\n  max_length: 128\neval:\n  max_new_tokens: 4\n  judge_retry_wait_s: 0.01\n"
    )
    out = tmp_path / "out"
    argv = ["--config", str(conf), "--model", f"clo={tmp_path / 'clo'}", "--versus", f"sft={tmp_path / 'sft'}"]
    argv += ["--prompts", str(prompts), "--out-dir", str(out), "--set", f"eval.judge_endpoint={server.url}"]
    assert cli.main(argv) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["judge"]["pairs"] == [["clo", "sft"]]
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    for lang in ("en", "ko"):
        r = rep["judge"]["results"]["clo"]["sft"][lang]
        clo = [g["response"] for g in gens if g["model"] == "clo" and g["lang"] == lang]
        # the fake judge prefers the non-empty answer: clo wins in both orders on every prompt
        assert all(clo) and (r["wins"], r["losses"], r["ties"], r["win_rate"]) == (6, 0, 0, 1.0)
        assert r["lc_win_rate"] == 1.0 and r["off_format"] == 0 and r["judgments"] == 6
    md = (out / "report.md").read_text()
    assert "| judge win rate vs sft, ko (↑) | 1.000" in md and "length-controlled win rate vs sft, en" in md
    assert "0 off-format replies" in md and (out / "judge_cache.jsonl").is_file()
    n = len(server.requests)
    assert cli.main(argv) == 0 and len(server.requests) == n + 1  # rerun: only the reachability check is sent
    # --versus without a judge endpoint is refused before anything runs
    assert cli.main(argv[:-2]) == 2 and "--versus needs an LLM judge" in capsys.readouterr().err


def test_a_judge_that_fails_every_judgment_after_its_probe_is_not_a_success(server, tmp_path, capsys):
    """The start-up probe passes, every judgment then fails: the report is written, but the command exits 1 naming
    the pair, the language and the first failure (a report with no judgment is not a win rate)."""
    from helpers import ROWS, make_model, make_tokenizer

    from clo_fast.evaluate import cli

    tok = make_tokenizer()
    for name in ("clo", "sft"):
        make_model(tok).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    rows = [{**r, "prompt_en": r["prompt_en"] + " broken", "prompt_tgt": r["prompt_tgt"] + " broken"} for r in ROWS]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:2]), encoding="utf-8")
    conf = tmp_path / "run.yaml"
    conf.write_text(
        "data:\n  target_lang: ko\n  max_length: 128\neval:\n  max_new_tokens: 2\n  judge_retry_wait_s: 0.01\n"
        "  judge_max_retries: 1\n"
    )
    out = tmp_path / "out"
    argv = ["--config", str(conf), "--model", f"clo={tmp_path / 'clo'}", "--versus", f"sft={tmp_path / 'sft'}"]
    argv += ["--prompts", str(prompts), "--out-dir", str(out), "--set", f"eval.judge_endpoint={server.url}"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "clo vs sft, en: 0/2 prompts judged" in err and "HTTP 500" in err
    assert (out / "report.json").is_file()


def test_a_judge_endpoint_echoing_headers_leaks_no_key_into_the_report(tmp_path, monkeypatch):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from clo_fast.evaluate.judge import run_judge
    from clo_fast.evaluate.report import write_report

    class Echo(BaseHTTPRequestHandler):
        def do_POST(self):  # an endpoint that answers with the request's headers and path
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"echo": dict(self.headers), "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    key, url_key = "sk-test-" + "k" * 24, "querysecret123"
    monkeypatch.setenv("CLO_TEST_JUDGE_KEY", key)
    cfg = RunConfig()
    cfg.eval.judge_endpoint = f"http://127.0.0.1:{server.server_port}/v1?api-key={url_key}"
    cfg.eval.judge_api_key_env = "CLO_TEST_JUDGE_KEY"
    items = [{"lang": "en", "prompt": "Hi"}]
    try:
        judge = run_judge(cfg, items, {"base": ["a"], "trained": ["b"]}, ["en"])
    finally:
        server.shutdown()
    assert judge["results"]["trained"]["base"]["en"]["errors"] == 2  # both orders
    report = {"eval_config": to_dict(cfg)["eval"], "judge": judge, "models": {}, "languages": ["en"]}
    report.update(target_lang="sw", n_prompts={"en": 1})
    files = write_report(report, [], tmp_path)
    from pathlib import Path

    written = Path(files["json"]).read_text() + Path(files["markdown"]).read_text()
    assert "unexpected judge reply" in written  # the error is kept, without its secrets
    assert key not in written and url_key not in written
    assert "127.0.0.1" in written


def test_judge_url_keeps_the_query_string_after_the_path():
    from clo_fast.evaluate.judge import judge_url

    assert judge_url("http://h/v1/?api-key=x") == "http://h/v1/chat/completions?api-key=x"
    assert judge_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
