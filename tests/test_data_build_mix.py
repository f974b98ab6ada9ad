"""Several datasets mixed (data.sources, clo_fast/data/build.py): each read, translated by its own translator and
gated as a single source is, counts by max_examples or by weight, duplicates removed across the mix, the mix
stated in the summary; a one-entry list is the one-source spelling. Sources: fresh random subsets of the demo's
real pairs (so the quality gate has real translations to pass)."""

import json

import pytest

from clo_fast.config import ConfigError, DataConfig, load_config
from clo_fast.data import build_text_dataset
from clo_fast.data.build import mix_counts, translate_sharded
from clo_fast.demo_model import demo_records


class TableTranslator:
    """An hf-like translator (it has a cache) that knows the demo's Swahili: the English replay set's path."""

    name = "table"

    def __init__(self):
        self.cache = object()
        self.table = {r[k]: r[f"{k}_sw"] for r in demo_records() for k in ("instruction", "response")}
        self.stats = {"backend": "hf", "texts": 0}
        self.asked: list[str] = []

    def translate(self, texts):
        self.asked += list(texts)
        self.stats["texts"] += len(texts)
        return [self.table[t] for t in texts]

    def translate_pairs(self, pairs, src, tgt):
        out = self.translate([p.instruction for p in pairs] + [p.response for p in pairs])
        return list(zip(out[: len(pairs)], out[len(pairs) :], strict=True))


def _files(tmp_path, rng, sizes):
    """Disjoint random subsets of the demo pairs (demo-085 left out: the gate drops it), one jsonl file each; the
    second and later files without translations (English replay sets)."""
    recs = [r for r in demo_records() if r["id"] != "demo-085"]
    rng.shuffle(recs)
    paths, start = [], 0
    for k, n in enumerate(sizes):
        part = recs[start : start + n]
        start += n
        keep = ("id", "instruction", "response") + (("instruction_sw", "response_sw") if k == 0 else ())
        path = tmp_path / f"source{k}.jsonl"
        path.write_text("".join(json.dumps({f: r[f] for f in keep}) + "\n" for r in part), encoding="utf-8")
        paths.append((path, {r["id"] for r in part}))
    return paths


def _cfg(tmp_path, sources, **kw):
    return DataConfig(
        target_lang="sw",
        sources=sources,
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"),
        **kw,
    )


def _source_of(row_id: str) -> int:
    return int(row_id.split("/", 1)[0])


def test_two_datasets_by_max_examples_each_through_its_own_translator(tmp_path, rng):
    sizes = [rng.randint(20, 40), rng.randint(20, 40)]
    (a, ids_a), (b, ids_b) = _files(tmp_path, rng, sizes)
    take = [rng.randint(5, sizes[0]), rng.randint(5, sizes[1])]
    cfg = _cfg(
        tmp_path,
        [{"source": str(a), "max_examples": take[0]}, {"source": str(b), "translator": "hf", "max_examples": take[1]}],
        eval_fraction=0.2,
    )
    replay = TableTranslator()
    from clo_fast.data.translate import ColumnsTranslator

    dsd, summary = build_text_dataset(cfg, translator={"columns": ColumnsTranslator(), "hf": replay}, progress=False)
    rows = list(dsd["train"]) + list(dsd["eval"])
    by_source = [[r for r in rows if _source_of(r["id"]) == k] for k in (0, 1)]
    assert [len(x) for x in by_source] == take
    assert {r["id"].split("/", 1)[1] for r in by_source[0]} <= ids_a
    assert {r["id"].split("/", 1)[1] for r in by_source[1]} <= ids_b
    # the replay set went through the hf translator, the first set kept its given translations (none asked)
    assert set(replay.asked) == {t for r in by_source[1] for t in (r["prompt_en"], r["response_en"])}
    table = {r["instruction"]: r["instruction_sw"] for r in demo_records()}
    assert all(r["prompt_tgt"] == table[r["prompt_en"]] for r in rows)
    mix = summary["mix"]
    assert [m["selected"] for m in mix] == [m["kept"] for m in mix] == take
    assert [m["records_read"] for m in mix] == sizes and [m["translator"] for m in mix] == ["columns", "hf"]
    assert sum(m["share"] for m in mix) == pytest.approx(1.0, abs=1e-3)
    assert summary["kept"] == sum(take) and summary["eval"] == round(0.2 * sum(take))


def test_weights_set_the_shares_and_the_largest_mix_every_source_can_give(rng):
    for _ in range(200):
        k = rng.randint(1, 4)
        available = [rng.randint(0, 500) for _ in range(k)]
        weights = [round(rng.uniform(0.05, 5), 2) for _ in range(k)]
        cap = rng.choice([None, rng.randint(1, 800)])
        cfg = DataConfig(sources=[{"source": "demo", "weight": w} for w in weights], max_examples=cap)
        cfg.sources = [type("S", (), {"weight": w, "max_examples": None})() for w in weights]
        counts = mix_counts(cfg, available)
        shares = [w / sum(weights) for w in weights]
        size = min(int(a / s) for a, s in zip(available, shares, strict=True))
        size = size if cap is None else min(size, cap)
        assert sum(counts) == size and all(0 <= c <= a for c, a in zip(counts, available, strict=True))
        assert all(abs(c - size * s) < 1 for c, s in zip(counts, shares, strict=True)), (counts, size, shares)


def test_a_weighted_mix_end_to_end_and_duplicates_across_datasets(tmp_path, rng):
    (a, _), (b, _) = _files(tmp_path, rng, [40, 30])
    # the replay set repeats three prompts of the first set: they are kept once, from the first listed
    first = [json.loads(x) for x in a.read_text().splitlines()]
    dup = rng.sample(first, 3)
    with b.open("a", encoding="utf-8") as f:
        for r in dup:
            f.write(json.dumps({"id": "again-" + r["id"], "instruction": r["instruction"], "response": "x"}) + "\n")
    cfg = _cfg(
        tmp_path,
        [{"source": str(a), "weight": 3}, {"source": str(b), "translator": "hf", "weight": 1}],
        eval_fraction=0.0,
    )
    replay = TableTranslator()
    translators = translate_sharded(cfg, 0, 1, translator=replay, progress=False)
    dsd, summary = build_text_dataset(cfg, translator=translators, progress=False)
    assert summary["duplicate_prompts_removed"] == 3
    counts = [sum(_source_of(i) == k for i in dsd["train"]["id"]) for k in (0, 1)]
    # 40 and 30 available at 3 : 1: the first set is the limit (40 / 0.75 = 53 pairs), the replay set gives 13
    assert counts == [m["kept"] for m in summary["mix"]] == [40, 13]
    assert len(set(dsd["train"]["prompt_en"])) == 53


def test_a_one_entry_list_is_the_one_source_spelling(tmp_path, rng):
    n = rng.randint(10, 60)
    single, _ = build_text_dataset(
        DataConfig(target_lang="sw", max_examples=n, cache_dir=str(tmp_path / "c")), progress=False
    )
    listed, summary = build_text_dataset(_cfg(tmp_path, [{"source": "demo", "max_examples": n}]), progress=False)
    for split in ("train", "eval"):
        assert single[split].to_list() == listed[split].to_list()
    assert summary["mix"][0]["selected"] == n


@pytest.mark.parametrize(
    "sources, extra, message",
    [
        ("[{source: demo, weight: 1}, {source: world}]", [], "data.sources: give a weight on every source or on none"),
        ("[{source: demo, weight: 1, max_examples: 3}]", [], r"data.sources.0.max_examples: give max_examples or"),
        ("[{source: demo, weight: 0}]", [], r"data.sources.0.weight: must be > 0"),
        ("[{source: demo}]", ["data.source=world"], "data.source .* and data.sources are both set"),
        ("[{source: demo}]", ["data.max_examples=5"], "data.max_examples: sizes a weighted mix only"),
        ("[{max_examples: 5}]", [], r"data.sources.0.source: is required"),
        ("[{source: demo, colour: 1}]", [], r"data.sources.0.colour: unknown key"),
        ("[{source: x.jsonl, source_format: oasst}]", [], r"data.sources.0.translator: oasst data carries no"),
    ],
)
def test_bad_mixes_stop_at_start_up_naming_the_entry(sources, extra, message):
    overrides = [f"data.sources={sources}", "data.target_lang=sw"] + extra
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
