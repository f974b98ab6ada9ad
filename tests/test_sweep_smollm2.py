"""scripts/sweep_smollm2.py's selection rule, on synthetic validation metrics: English kept (NLL/token within 5% of
the base's, no more loops than the base), then the highest Swahili fidelity, ties to Swahili chrF; none if none."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "sweep_smollm2.py"


def _sweep():
    spec = importlib.util.spec_from_file_location("sweep_smollm2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _metrics(en_nll, en_loop, sw_fid, sw_chrf):
    return {"en": {"nll_per_token": en_nll, "loop_rate": en_loop}, "sw": {"fidelity": sw_fid, "chrf": sw_chrf}}


def test_the_rule_keeps_english_first_then_takes_the_best_swahili():
    sweep = _sweep()
    m = {
        "base": _metrics(2.50, 0.10, 0.0, 10.0),
        "lr 1e-05": _metrics(2.45, 0.05, 0.20, 15.0),
        "lr 3e-05": _metrics(2.60, 0.10, 0.40, 18.0),  # +4%: kept
        "lr 1e-04": _metrics(2.70, 0.05, 0.90, 30.0),  # +8%: English not kept, whatever its Swahili
        "lr 3e-04": _metrics(2.40, 0.20, 0.95, 31.0),  # loops more than the base
    }
    keeps, chosen = sweep.choose(m, [k for k in m if k != "base"])
    assert keeps == {"lr 1e-05": True, "lr 3e-05": True, "lr 1e-04": False, "lr 3e-04": False}
    assert chosen == "lr 3e-05"
    m["lr 1e-05"]["sw"]["fidelity"] = 0.40  # a tie on fidelity: chrF decides
    assert sweep.choose(m, ["lr 1e-05", "lr 3e-05"])[1] == "lr 3e-05"
    assert sweep.choose(m, ["lr 1e-04", "lr 3e-04"]) == ({"lr 1e-04": False, "lr 3e-04": False}, None)


def test_the_rule_against_a_brute_force_on_random_metrics():
    sweep = _sweep()
    rng = random.Random()
    for _ in range(200):
        base = _metrics(rng.uniform(2, 3), rng.choice([0.0, 0.1]), 0.0, 5.0)
        runs = {f"r{i}": _metrics(rng.uniform(2, 3.5), rng.choice([0.0, 0.1, 0.2]), rng.random(), rng.uniform(0, 50))
                for i in range(4)}  # fmt: skip
        keeps, chosen = sweep.choose({"base": base, **runs}, list(runs))
        ok = [k for k, v in runs.items() if v["en"]["nll_per_token"] <= 1.05 * base["en"]["nll_per_token"]
              and v["en"]["loop_rate"] <= base["en"]["loop_rate"]]  # fmt: skip
        assert sorted(k for k, v in keeps.items() if v) == sorted(ok)
        best = sorted(ok, key=lambda k: (-runs[k]["sw"]["fidelity"], -runs[k]["sw"]["chrf"]))
        assert chosen == (best[0] if best else None)
