"""A 2-language demo run (data.target_langs: [sw, ko], clo_fast/train.py): one CLO example per English pair and
language in training (per-language step metrics), the fidelity probe and the final evaluation over both languages."""

import json

from test_train import cache, deepspeed_launcher, launch, metrics, needs_launcher, slow  # noqa: F401 (fixtures)


@slow
@needs_launcher
def test_a_two_language_demo_run_reports_both_languages(tmp_path, cache):  # noqa: F811
    extra = (
        "data.target_langs=[sw, ko]",
        "train.fidelity_prompts=2",
        "train.eval_steps=4",
        "eval.max_prompts=3",
        "eval.max_new_tokens=8",
    )
    r = launch(tmp_path, cache, ranks=1, extra=extra)
    assert r.returncode == 0, f"run failed; log: {tmp_path / 'launch.log'}\n{r.stderr[-3000:]}"
    logged = metrics(tmp_path / "run")
    trained = [m for m in logged.values() if "loss" in m]
    per_language = {f"{k}/{lang}" for k in ("nll", "rewards/margins", "rewards/accuracies") for lang in ("sw", "ko")}
    assert trained and all(per_language <= set(m) for m in trained)  # the batches carried the language
    probed = [m for m in logged.values() if "fidelity/sw" in m]
    assert probed and all({"fidelity/ko", "fidelity/en", "samples/ko", "samples/sw"} <= set(m) for m in probed)
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["target_langs"] == ["sw", "ko"] and report["languages"] == ["en", "sw", "ko"]
    assert report["n_prompts"] == {"en": 3, "sw": 3, "ko": 3}
    assert "data: 240 train / 28 eval examples" in r.stdout  # 120 + 14 pairs, each in both languages
