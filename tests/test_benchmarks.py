"""Benchmarks through lm-evaluation-harness (offline): the shipped local multiple-choice task (the harness's own YAML
task format over a JSONL file) on small Llama models, its accuracy against a float64 hand computation; the
task names the README gives for the paper's MMMLU; bad input before any model loads."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import re
from pathlib import Path

import pytest
import torch

import clo_fast.config as config
from clo_fast.config import ConfigError, RunConfig
from clo_fast.evaluate import benchmarks as B
from clo_fast.evaluate.errors import EvalError

DOCS = [json.loads(line) for line in (B.SHIPPED_TASKS_DIR / "demo_mc" / "demo_mc.jsonl").read_text().splitlines()]
TASKS = ["demo_mc_en", "demo_mc_sw"]


def hand_loglikelihoods(model, tok, doc) -> list[float]:
    """Σ log p(choice tokens | question) per choice, float64, no batching or padding: the context is the task's
    doc_to_text ("{question}\\nAnswer:"), the continuation " " + choice (the harness's default delimiter); the
    continuation's tokens are those of the whole string after the context's own tokens."""
    m = type(model)(model.config).double().eval()
    m.load_state_dict(model.state_dict())
    context = f"{doc['question']}\nAnswer:"
    ctx = tok(context)["input_ids"]
    out = []
    for choice in doc["choices"]:
        whole = tok(context + " " + choice)["input_ids"]
        assert whole[: len(ctx)] == ctx
        with torch.no_grad():
            logp = torch.log_softmax(m(torch.tensor([whole])).logits[0].double(), -1)
        out.append(sum(float(logp[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
    return out


def check_against_hand(model, tok, tmp_path):
    cfg = RunConfig()
    cfg.eval.batch_size = 3  # several requests per batch: padding must not change the scores
    manager = B.check_benchmarks(cfg, TASKS)
    res = B.run_benchmarks(model, tok, cfg, manager, TASKS, keep_samples=True)
    for task in TASKS:
        lang = task.rsplit("_", 1)[1]
        docs = [d for d in DOCS if d["lang"] == lang]
        hand = [hand_loglikelihoods(model, tok, d) for d in docs]
        picks = [max(range(len(h)), key=h.__getitem__) for h in hand]
        for h in hand:  # the argmax must not hinge on float32 noise, or the comparison would prove nothing
            top = sorted(h)
            assert top[-1] - top[-2] > 1e-4
        acc = sum(p == d["answer"] for p, d in zip(picks, docs, strict=True)) / len(docs)
        assert res[task]["acc"] == pytest.approx(acc, abs=1e-12) and res[task]["n"] == len(docs) == 10
        se = (acc * (1 - acc) / (len(docs) - 1)) ** 0.5  # the sample standard error of a mean of 0/1
        assert res[task]["acc_stderr"] == pytest.approx(se, rel=1e-9) and res[task]["lang"] == lang
        got = sorted(res["_samples"][task], key=lambda s: s["doc_id"])
        for s, h, d in zip(got, hand, docs, strict=True):
            assert s["target"] == d["answer"]
            assert s["loglikelihoods"] == pytest.approx(h, abs=2e-4)
    assert res["_settings"]["chat_template"] is False  # data.template plain: no chat template
    return res


def test_local_task_accuracy_equals_hand_computation(tmp_path):
    from helpers import make_model, make_tokenizer

    tok = make_tokenizer()
    check_against_hand(make_model(tok, seed=0), tok, tmp_path)


@pytest.mark.slow
def test_local_task_on_the_demo_model(demo_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32).eval()
    check_against_hand(model, AutoTokenizer.from_pretrained(demo_model_dir), tmp_path)


def test_task_language():
    assert [B.task_language(t) for t in ("mmlu", "mmmlu_sw_ke", "global_mmlu_full_yo", "belebele_zho_Hans")] == [
        "en",
        "sw",
        "yo",
        "zh",
    ]
    assert B.task_language("demo_mc_sw") == "sw" and B.task_language("hellaswag") is None


@pytest.fixture(scope="module")
def harness_tasks():  # slow tier: reading every task YAML of the harness takes 20-30 s here
    return set(B.task_manager(RunConfig()).all_tasks)  # every task of the installed harness (~20 s)


@pytest.mark.slow
def test_documented_task_names_exist_in_the_harness(harness_tasks):
    """The table of the paper's MMMLU tasks (benchmarks.py, and docs/EVALUATION.md) names real harness tasks."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "EVALUATION.md").read_text(encoding="utf-8")
    for text in (B.__doc__, doc):
        rows = re.findall(r"^\| (en|zh|de|ko|id|sw|yo) \|(.*)\|$", text, re.M)
        names = [n for _, cells in rows for n in re.findall(r"`([\w-]+)`", cells)]
        assert len(names) >= 14, names
        assert sorted(set(names) - harness_tasks) == []
        assert all(B.task_language(n) == lang for lang, cells in rows for n in re.findall(r"`([\w-]+)`", cells))


@pytest.mark.slow
def test_bad_benchmark_input_fails_before_any_model_loads(tmp_path, monkeypatch, harness_tasks):
    import clo_fast.evaluate.run as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    cfg = RunConfig()
    cfg.eval.benchmarks = ["demo_mc_sw", "mmmlu_xx_yy"]
    with pytest.raises(EvalError, match=r"eval.benchmarks / --benchmarks: unknown .*\['mmmlu_xx_yy'\]"):
        run.evaluate_models(cfg, [str(tmp_path / "m")], prompts=[{"prompt": "hi", "lang": "en"}])
    monkeypatch.setattr(config, "_has_module", lambda name: name != "lm_eval")  # lm-eval not installed
    with pytest.raises(ConfigError, match="eval.benchmarks: needs the lm-eval package"):
        run.evaluate_models(cfg, [str(tmp_path / "m")], prompts=[{"prompt": "hi", "lang": "en"}])
    cfg.eval.benchmarks = []
    cfg.eval.benchmark_chat_template = "sometimes"
    with pytest.raises(ConfigError, match="eval.benchmark_chat_template"):
        cfg.validate()


def test_evaluate_models_reports_benchmarks(tmp_path):
    """eval.benchmarks through evaluate_models: accuracy ± stderr per model in report.json, report.md and the plot."""
    from helpers import ROWS, make_cfg, make_model, make_tokenizer

    from clo_fast.evaluate import evaluate_models

    tok = make_tokenizer()
    cfg = make_cfg(tmp_path, max_new_tokens=2, max_prompts=1, benchmarks=["demo_mc_sw"], benchmark_limit=4)
    models = [("a", (make_model(tok, seed=0), tok)), ("b", (make_model(tok, seed=1), tok))]
    report = evaluate_models(cfg, models, prompts=ROWS[:1])
    rows = {label: report["models"][label]["benchmarks"]["demo_mc_sw"] for label in ("a", "b")}
    assert all(r["n"] == 4 and r["lang"] == "sw" and r["acc"] in (0, 0.25, 0.5, 0.75, 1) for r in rows.values())
    md = (tmp_path / "eval" / "report.md").read_text()
    cells = " | ".join(f"{r['acc']:.3f} ± {r['acc_stderr']:.3f}" for r in rows.values())
    assert f"| demo_mc_sw (sw) accuracy (↑) | {cells} |" in md
    assert (tmp_path / "eval" / "report.png").read_bytes()[:4] == b"\x89PNG"
