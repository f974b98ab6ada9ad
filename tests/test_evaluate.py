"""clo_fast.evaluate on a tiny random Llama saved to disk and loaded through the real path (offline)."""

import importlib
import os

from helpers import (
    CONVERSATIONS,
    ROWS,
    SlowCachedTranslator,
    data_config,
    make_cfg,
    make_model,
    make_tokenizer,
    write_jsonl,
)

from clo_fast.data import build_text_dataset, format_prompt, tokenize_dataset

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import re

import pytest
import torch
from transformers import LlamaForCausalLM

from clo_fast import evaluate as E
from clo_fast.config import ConfigError
from clo_fast.constants import IGNORE_INDEX
from clo_fast.evaluate import cli as eval_cli
from clo_fast.evaluate.answers import is_echo, is_loop
from clo_fast.language_id import UnknownLanguageError, get_identifier

for extra in ("lingua", "matplotlib"):  # the `test` extra: a missing package fails, never skips
    importlib.import_module(extra)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = make_tokenizer()
    paths = {}
    for name, kw in (("base", {}), ("mute", {"mute": True})):
        d = root / name
        make_model(tok, **kw).save_pretrained(d)
        tok.save_pretrained(d)
        paths[name] = str(d)
    return paths


def independent_nll(model, tok, items, template):
    """float64, full logits, no padding: Σ −log p(response tokens + EOS) and the token count."""
    m = LlamaForCausalLM(model.config).double().eval()
    m.load_state_dict(model.state_dict())
    total, count = 0.0, 0
    for it in items:
        p = tok(template.format(instruction=it["prompt"]))["input_ids"]
        r = tok(it["reference"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(m(torch.tensor([p + r])).logits[0].double(), -1)
        for j, t in enumerate(r):
            total -= float(logp[len(p) - 1 + j, t])
        count += len(r)
    return total, count


# ------------------------------------------------------------------------------------------- tests
def test_sequence_logprob_sums_match_float64():
    torch.manual_seed(1)
    S, T, H, V = 3, 7, 16, 50
    hidden, weight = torch.randn(S, T, H), torch.randn(V, H)
    labels = torch.randint(0, V, (S, T))
    labels[0, :3] = IGNORE_INDEX
    labels[2, -2:] = IGNORE_INDEX
    lp = torch.log_softmax(hidden.double() @ weight.double().T, -1)
    ref = torch.where(labels != -100, lp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0.0).sum(1)
    got = E.sequence_logprob_sums(hidden, weight, labels)
    assert got.dtype == torch.float32 and got.shape == (S,)
    assert (got.double() - ref).norm() / ref.norm() < 1e-5


def test_reference_batch_shifts_labels():
    b = E.build_reference_batch([([5, 6, 7], [8, 9]), ([5], [4])], pad_token_id=1)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 4, 1, 1, 1]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, 8, 9, -100], [4, -100, -100, -100, -100]]


def test_batched_greedy_matches_single_and_manual_loop(saved, tmp_path):
    cfg = make_cfg(tmp_path)
    model, tok = E.load_model(saved["base"], cfg)
    assert tok.padding_side in ("left", "right")  # we pad by hand; the tokenizer setting must not matter
    items = E.normalize_prompts(ROWS, "ko")
    ids = [E.encode_prompt(tok, it["prompt"], cfg.data) for it in items]
    assert len({len(i) for i in ids}) > 2  # different lengths: left padding is exercised
    batched = E.generate_responses(model, tok, ids, max_new_tokens=6, batch_size=4)
    single = E.generate_responses(model, tok, ids, max_new_tokens=6, batch_size=1)
    assert batched == single
    # independent greedy loop (full forward each step, no cache, no padding) for the longest and shortest prompt
    for k in (max(range(len(ids)), key=lambda i: len(ids[i])), min(range(len(ids)), key=lambda i: len(ids[i]))):
        seq = list(ids[k])
        new = []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                seq.append(nxt)
                new.append(nxt)
        assert batched[k]["tokens"] == len(new)
        assert batched[k]["text"] == tok.decode(new, skip_special_tokens=True).strip()


def test_reference_nll_matches_float64(saved, tmp_path):
    cfg = make_cfg(tmp_path)
    model, tok = E.load_model(saved["base"], cfg)
    items = [it for it in E.normalize_prompts(ROWS, "ko") if it["lang"] == "ko"]
    ex = list(E.reference_examples(tok, items, cfg.data))
    got_sum, got_n = E.reference_nll(model, tok, ex, batch_size=2)
    ref_sum, ref_n = independent_nll(model, tok, items, cfg.data.prompt_template)
    assert got_n == ref_n > 0
    assert abs(got_sum - ref_sum) / ref_sum < 1e-5


def test_evaluate_models_end_to_end(saved, tmp_path):
    cfg = make_cfg(tmp_path, judge_baseline="mute")

    def fake_judge(payload):  # prefers the non-empty answer: the base model beats the mute one every time
        text = payload["messages"][-1]["content"]
        a = re.search(r"# Answer A\n(.*?)\n\n# Answer B\n", text, re.S).group(1)
        return "I compared both.\nVerdict: A" if a.strip() else "Verdict: B"

    report = E.evaluate_models(
        cfg, [f"base={saved['base']}", f"mute={saved['mute']}"], prompts=ROWS, judge_send=fake_judge
    )
    out = tmp_path / "eval"
    for name in ("report.json", "report.md", "report.png", "generations.jsonl"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["models"] == report["models"]
    assert report["languages"] == ["en", "ko"] and report["n_prompts"] == {"en": 3, "ko": 3}

    # fidelity and lengths re-derived from the generations file with the same detector
    gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(gens) == 12
    lid = get_identifier(["en", "ko"])
    for label in ("base", "mute"):
        for lang in ("en", "ko"):
            g = [x for x in gens if x["model"] == label and x["lang"] == lang]
            m = report["models"][label]["metrics"][lang]
            det = lid.detect_batch([x["response"] for x in g])
            assert [x["detected"] for x in g] == det
            assert m["language_match"] == pytest.approx(sum(d == lang for d in det) / len(det))
            faithful = [d == lang and not (is_echo(x["prompt"], x["response"]) or is_loop(x["response"]))
                        for d, x in zip(det, g, strict=True)]  # fmt: skip
            assert [x["faithful"] for x in g] == faithful
            assert m["fidelity"] == pytest.approx(sum(faithful) / len(det))
            assert m["mean_response_tokens"] == pytest.approx(sum(x["response_tokens"] for x in g) / len(g))
    mute = report["models"]["mute"]["metrics"]
    assert all(mute[lang]["fidelity"] == 0.0 and mute[lang]["mean_response_tokens"] == 0.0 for lang in ("en", "ko"))
    assert all(mute[lang]["finished_share"] == 1.0 and mute[lang]["detected"] == {"none": 3} for lang in ("en", "ko"))
    assert report["models"]["base"]["metrics"]["en"]["mean_response_tokens"] > 0

    # NLL per token against an independent float64 computation
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(saved["base"])
    for label in ("base", "mute"):
        model = AutoModelForCausalLM.from_pretrained(saved[label])
        for lang, (pk, rk) in (("en", ("prompt_en", "response_en")), ("ko", ("prompt_tgt", "response_tgt"))):
            items = [{"prompt": r[pk], "reference": r[rk]} for r in ROWS]
            s, n = independent_nll(model, tok, items, cfg.data.prompt_template)
            m = report["models"][label]["metrics"][lang]
            assert m["nll_tokens"] == n and m["nll_sequences"] == 3
            assert m["nll_per_token"] == pytest.approx(s / n, rel=1e-5)
    # mute model: all logits 0 -> uniform -> NLL/token is exactly log V
    assert mute["ko"]["nll_per_token"] == pytest.approx(torch.log(torch.tensor(float(len(tok)))).item(), rel=1e-6)

    assert report["nll_comparable"] and report["models"]["base"]["tokenizer"] == report["models"]["mute"]["tokenizer"]

    # judge and the Markdown table
    res = report["judge"]["results"]
    assert report["judge"]["pairs"] == [["base", "mute"]] and set(res) == {"base"}
    ko = res["base"]["mute"]["ko"]  # both orders of 3 prompts: the non-empty answer wins every time
    assert (ko["win_rate"], ko["wins"], ko["judgments"], ko["lc_win_rate"]) == (1.0, 6, 6, 1.0)
    md = (out / "report.md").read_text()
    assert "| metric | base | mute |" in md
    base_nll_ko = report["models"]["base"]["metrics"]["ko"]["nll_per_token"]
    assert f"{base_nll_ko:.3f}" in md and "| fidelity ko (↑) |" in md and "judge win rate vs mute, ko" in md


def test_judge_skipped_without_endpoint(saved, tmp_path, capsys):
    cfg = make_cfg(tmp_path, max_prompts=1, max_new_tokens=2)
    report = E.evaluate_models(cfg, [saved["base"]], prompts=ROWS[:1], out_dir=tmp_path / "o")
    assert report["judge"] == {"skipped": "eval.judge_endpoint is not set"}
    assert "LLM judge skipped" in capsys.readouterr().err
    assert list(report["models"]) == ["base"]  # label from the path's last component
    assert "LLM judge: skipped" in (tmp_path / "o" / "report.md").read_text()


def test_chat_template_and_item_prompts(saved, tmp_path):
    cfg = make_cfg(tmp_path, max_new_tokens=3)
    cfg.data.template = "chat"
    _, tok = E.load_model(saved["base"], cfg)
    s = format_prompt("Hi there", tok, cfg.data)
    assert s == "<s><|user|>\nHi there</s>\n<|assistant|>\n"
    ids = E.encode_prompt(tok, "Hi there", cfg.data)
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # no second BOS
    prompts = [
        {"prompt": "Explain why the sky is blue.", "lang": "en"},
        {"prompt": "하늘이 왜 파란지 설명해 주세요.", "lang": "ko", "reference": "공기가 파란빛을 흩뜨립니다."},
    ]
    report = E.evaluate_models(cfg, [("m", saved["base"])], prompts=prompts)
    m = report["models"]["m"]["metrics"]
    assert m["en"]["nll_per_token"] is None and m["en"]["nll_sequences"] == 0  # no reference given
    assert m["ko"]["nll_per_token"] > 0 and report["template"] == "chat"


def test_prompts_from_text_dataset_eval_split(monkeypatch, tmp_path):  # the data builder itself is faked here
    import datasets

    calls = []

    def build_text_dataset(data_cfg):
        calls.append(data_cfg.target_lang)
        return datasets.DatasetDict(
            {
                "train": datasets.Dataset.from_list(ROWS[:1]),
                "eval": datasets.Dataset.from_list(ROWS[1:] if data_cfg.eval_fraction else ROWS[:0]),
            }
        ), {}

    import clo_fast.data

    monkeypatch.setattr(clo_fast.data, "load_or_build_text_dataset", build_text_dataset)
    cfg = make_cfg(tmp_path, max_prompts=1)
    got = E.load_eval_prompts(cfg)
    assert calls == ["ko"] and [r["id"] for r in got] == ["b"]
    cfg.data.eval_fraction = 0.0
    with pytest.raises(E.EvalError, match="no evaluation prompts.*'eval' split"):
        E.load_eval_prompts(cfg)


def test_bad_inputs_raise_clear_errors(saved, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # offline even when another test module imported huggingface_hub before HF_HUB_OFFLINE was set
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = make_cfg(tmp_path)
    with pytest.raises(E.EvalError, match="no evaluation prompts"):
        E.evaluate_models(cfg, [saved["base"]], prompts=[])
    with pytest.raises(UnknownLanguageError, match="'xx'"):
        E.evaluate_models(cfg, [saved["base"]], prompts=[{"prompt": "hello", "lang": "xx"}])
    cfg.data.target_lang = "qq"
    with pytest.raises(UnknownLanguageError, match="'qq'"):
        E.evaluate_models(cfg, [saved["base"]], prompts=ROWS)
    cfg.data.target_lang = "ko"
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(E.EvalError, match=re.escape(missing)):
        E.evaluate_models(cfg, [missing], prompts=ROWS)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(E.EvalError, match=re.escape(str(empty)) + ".*no config.json"):
        E.load_model(str(empty), cfg)
    afile = tmp_path / "weights.bin"
    afile.write_bytes(b"x")
    with pytest.raises(E.EvalError, match="is a file"):
        E.load_model(str(afile), cfg)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(E.EvalError, match=re.escape(str(broken))):
        E.load_model(str(broken), cfg)
    with pytest.raises(E.EvalError, match="cannot load the tokenizer of model 'nobody/no-such-model'"):
        E.load_model("nobody/no-such-model", cfg)  # hub name, offline
    with pytest.raises(E.EvalError, match="missing or non-string prompt_tgt"):
        E.normalize_prompts([{"prompt_en": "hi"}], "ko")
    with pytest.raises(E.EvalError, match="no 'lang'"):
        E.normalize_prompts([{"prompt": "hi"}], "ko")
    with pytest.raises(E.EvalError, match="empty prompt"):
        E.normalize_prompts([{"prompt": "  ", "lang": "en"}], "ko")
    with pytest.raises(E.EvalError, match="used twice"):
        E.parse_model_specs([saved["base"], saved["base"]])
    with pytest.raises(ConfigError, match="eval.batch_size"):
        E.evaluate_models(make_cfg(tmp_path, batch_size=0), [saved["base"]], prompts=ROWS)
    with pytest.raises(ConfigError, match="eval.detector_languages"):
        make_cfg(tmp_path, detector_languages=["zz"]).validate()
    with pytest.raises(E.EvalError, match="judge_baseline 'nope'"):
        E.evaluate_models(
            make_cfg(tmp_path, judge_baseline="nope", max_new_tokens=1),
            [f"a={saved['base']}", f"b={saved['mute']}"],
            prompts=ROWS[:1],
            judge_send=lambda p: "Verdict: A",
        )


def test_cli(saved, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS[:2]), encoding="utf-8")
    conf = tmp_path / "run.yaml"
    conf.write_text(
        f"data:\n  target_lang: ko\n  max_length: 128\neval:\n  max_new_tokens: 3\n  output_dir: {tmp_path / 'cli'}\n"
    )
    rc = eval_cli.main(
        [
            "--config",
            str(conf),
            "--model",
            f"base={saved['base']}",
            "--model",
            saved["mute"],
            "--prompts",
            str(prompts),
            "--batch-size",
            "3",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "| metric | base | mute |" in out
    rep = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert rep["eval_config"]["batch_size"] == 3 and rep["n_prompts"] == {"en": 2, "ko": 2}
    missing = str(tmp_path / "nowhere" / "model")
    rc = eval_cli.main(["--config", str(conf), "--model", missing, "--prompts", str(prompts)])
    err = capsys.readouterr().err
    assert rc == 2 and missing in err and err.startswith("error: ")


# ------------------------------------------------------------------------------------- LLM judge
def test_judge_request_and_url():
    p = E.build_judge_request("Say hi", "hello", "bonjour", "judge-1")
    assert p["model"] == "judge-1" and p["temperature"] == 0
    assert p["messages"][0]["role"] == "system" and p["messages"][1]["role"] == "user"
    user = p["messages"][1]["content"]
    assert user.index("Say hi") < user.index("# Answer A\nhello") < user.index("# Answer B\nbonjour")
    assert "model" not in E.build_judge_request("x", "a", "b", None)
    assert E.judge_url("http://h:8000/v1") == "http://h:8000/v1/chat/completions"
    assert E.judge_url("http://h/v1/chat/completions/") == "http://h/v1/chat/completions"


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("Verdict: A", "A"),
        ("verdict: b", "B"),
        ("Verdict: TIE", "tie"),
        ("**Verdict:** (B)", "B"),
        ("Verdict: [tie]", "tie"),
        ("verdicts: none", None),
        ("Answer A is a better start. Verdict: B", "B"),
        ("Verdict: A ... on reflection Verdict: B", "B"),
        ("A", "A"),
        (" b. ", "B"),
        ("Output (a)", "A"),
        ("tie", "tie"),
        ("I cannot decide", None),
        ("", None),
        ("A bit of both", None),
        (None, None),
    ],
)
def test_parse_verdict(reply, verdict):
    assert E.parse_verdict(reply) == verdict


def test_judge_pairwise_counts_and_never_guesses():
    ins = [f"q{i}" for i in range(20)]
    cand = [f"GOOD {i}" for i in range(20)]
    base = [f"meh {i}" for i in range(20)]

    def prefers_good(p):
        return "Verdict: A" if "# Answer A\nGOOD" in p["messages"][1]["content"] else "Verdict: B"

    r = E.judge_pairwise(ins, cand, base, prefers_good)
    assert (r["wins"], r["losses"], r["ties"], r["win_rate"], r["order_agreement"]) == (40, 0, 0, 1.0, 1.0)
    always_a = E.judge_pairwise(ins, cand, base, lambda p: "Verdict: A")  # both orders: position bias cancels
    assert (always_a["wins"], always_a["losses"], always_a["win_rate"], always_a["order_agreement"]) == (20, 20, 0.5, 0)
    r = E.judge_pairwise(ins[:4], cand[:4], base[:4], lambda p: "TIE")
    assert r["win_rate"] == 0.5 and r["ties"] == 8
    r = E.judge_pairwise(ins[:3], cand[:3], base[:3], lambda p: "no idea")
    assert r["win_rate"] is None and r["off_format"] == 6 and r["unjudged_prompts"] == 3

    def down(p):
        raise OSError("connection refused")

    r = E.judge_pairwise(ins[:2], cand[:2], base[:2], down)
    assert r["win_rate"] is None and r["errors"] == 4 and "connection refused" in r["first_error"]
    with pytest.raises(ValueError):
        E.judge_pairwise(ins[:2], cand[:1], base[:2], down)


def test_in_memory_model_is_used_and_its_mode_restored(tmp_path):
    tok = make_tokenizer()
    model = make_model(tok, seed=3).train()
    cfg = make_cfg(tmp_path, max_new_tokens=2, max_prompts=2)
    report = E.evaluate_models(cfg, [("live", (model, tok))], prompts=ROWS)
    assert model.training  # put back in train mode after evaluation
    assert report["models"]["live"]["path"] == "<in-memory model>" and report["n_prompts"] == {"en": 2, "ko": 2}
    items = [{"prompt": r["prompt_tgt"], "reference": r["response_tgt"]} for r in ROWS[:2]]
    s, n = independent_nll(model, tok, items, cfg.data.prompt_template)
    assert report["models"]["live"]["metrics"]["ko"]["nll_per_token"] == pytest.approx(s / n, rel=1e-5)


def test_eval_prompts_from_the_real_demo_data(tmp_path):
    cfg = make_cfg(tmp_path, max_prompts=3)
    cfg.data.source, cfg.data.target_lang, cfg.data.eval_fraction = "demo", "sw", 0.1
    cfg.data.output_dir, cfg.data.cache_dir = str(tmp_path / "data"), str(tmp_path / "cache")
    rows = E.load_eval_prompts(cfg)
    assert len(rows) == 3 and all(r["target_lang"] == "sw" and r["prompt_tgt"].strip() for r in rows)
    items = E.normalize_prompts(rows, "sw")
    assert [it["lang"] for it in items] == ["en", "sw"] * 3
    lid = get_identifier(["en", "sw"])  # the bundled references are in the languages they claim
    assert lid.detect_batch([it["reference"] for it in items]) == [it["lang"] for it in items]


def test_different_tokenizers_flag_nll_as_not_comparable(tmp_path):
    tok_a, tok_b = make_tokenizer(), make_tokenizer()
    tok_b.chat_template = "{{ messages[0]['content'] }}"
    model = make_model(tok_a)
    cfg = make_cfg(tmp_path, max_new_tokens=1, max_prompts=1)
    same = E.evaluate_models(cfg, [("a", (model, tok_a)), ("a2", (model, make_tokenizer()))], prompts=ROWS)
    assert same["nll_comparable"] is True
    report = E.evaluate_models(cfg, [("a", (model, tok_a)), ("b", (model, tok_b))], prompts=ROWS)
    assert report["nll_comparable"] is False
    assert "not comparable" in (tmp_path / "eval" / "report.md").read_text()


def test_device_map_auto_loads_the_same_model(saved, tmp_path):
    """eval.device_map=auto (accelerate places the layers; on a CPU-only machine, all on the CPU) gives the same
    greedy answers as the plain load. Sharding over several GPUs needs a GPU machine: not tested here."""
    cfg = make_cfg(tmp_path)
    plain, tok = E.load_model(saved["base"], cfg)
    cfg.eval.device_map = "auto"
    mapped, _ = E.load_model(saved["base"], cfg)
    ids = [E.encode_item(tok, it, cfg.data) for it in E.normalize_prompts(ROWS, "ko")]
    kw = {"max_new_tokens": 4, "batch_size": 2}
    assert E.generate_responses(mapped, tok, ids, **kw) == E.generate_responses(plain, tok, ids, **kw)
    cfg.eval.device_map = "balanced_low_0"
    with pytest.raises(ConfigError, match="eval.device_map"):
        cfg.validate()


def test_evaluation_prompts_encode_as_training_does(tmp_path, chatml_tok):
    """Evaluation items carry their language and conversation: the prompt ids equal the training prompt's
    (per-language system prompt, earlier turns), for every row and both languages."""
    from clo_fast.evaluate.prompts import encode_item, normalize_prompts

    src = write_jsonl(tmp_path / "conv.jsonl", CONVERSATIONS)
    cfg = data_config(tmp_path, source=str(src), source_format="messages", translator="hf", template="chat")
    cfg.eval_fraction, cfg.system_prompt, cfg.system_prompts = 0.0, "Be brief.", {"sw": "Jibu."}
    ds = build_text_dataset(cfg, translator=SlowCachedTranslator(tmp_path / "t.sqlite"), progress=False)[0]["train"]
    trained = tokenize_dataset(ds, chatml_tok, cfg)
    items = normalize_prompts([dict(r) for r in ds], "sw")
    assert len(items) == 2 * len(ds)
    for row, t in enumerate(trained):
        for item, seq in zip(items[2 * row : 2 * row + 2], (0, 2), strict=True):
            prompt_len = t["labels"][seq].index(next(x for x in t["labels"][seq] if x != -100))
            assert encode_item(chatml_tok, item, cfg) == t["input_ids"][seq][:prompt_len], (row, item["lang"])
