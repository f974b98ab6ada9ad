"""clo_fast.data.build: the text dataset's folder, and the data stage outside collectives (sharded translation
through the shared cache).

Deduplication of source pairs (select_pairs): a prompt is the same prompt only with the same conversation before it,
so oasst's every-turn pairs with a common follow-up ("Thanks! Can you elaborate?") in different threads are all
kept, and true copies are still removed."""

from __future__ import annotations

import json
import os

import pytest
from helpers import SlowCachedTranslator, data_config

from clo_fast.config import DataConfig, QualitySettings
from clo_fast.data import build_text_dataset


def test_save_text_dataset_into_a_user_folder_is_refused(tmp_path):
    import datasets

    from clo_fast.data.build import save_text_dataset

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    dsd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"a": ["x"]})})
    from clo_fast.data.sources import DataError

    with pytest.raises(DataError, match=r"data.output_dir: .*mine: output folder exists and was not created"):
        save_text_dataset(dsd, {}, mine)
    assert (mine / "precious.txt").read_text() == "keep"


def test_translate_sharded_covers_every_text_own_shard_first(tmp_path):
    from clo_fast.data.build import translate_sharded

    cfg = data_config(tmp_path, translator="hf", max_examples=20)
    fake = SlowCachedTranslator(tmp_path / "t.sqlite")
    translate_sharded(cfg, 1, 3, translator=fake, progress=False)
    dsd, _ = build_text_dataset(cfg, translator=fake, progress=False)
    rows = list(dsd["train"]) + list(dsd["eval"])
    assert len(rows) == 20 and all(r["prompt_tgt"] == f"[sw] {r['prompt_en']}" for r in rows)
    n_texts = len(fake.translated)
    assert n_texts == len({t for r in rows for t in (r["prompt_en"], r["response_en"])})  # built: nothing new
    # rank 1 of 3 starts with its own shard (every third selected pair from the second)
    from clo_fast.data.build import select_pairs
    from clo_fast.data.sources import BadRecords

    selected = select_pairs(cfg, BadRecords("error"), {})[0]
    own = [t for p in selected[1::3] for t in (p.instruction, p.response)]
    assert fake.translated[: len(set(own))] == list(dict.fromkeys(own))


COLLECTIVES = (
    "barrier", "all_reduce", "broadcast", "all_gather", "all_gather_object", "all_gather_into_tensor",
    "broadcast_object_list", "gather", "gather_object", "scatter", "scatter_object_list", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "monitored_barrier",
)  # fmt: skip


def _prepare_in_world(rank, world, port, tmp, out_dir):
    """One rank of a gloo world: runs the trainer's data stage with a translator that needs 0.05 s per text,
    every torch.distributed collective counted while it runs (the property: none, so no rank can wait in one while
    another translates; proved by the count, not by racing a collective timeout), then a barrier and a gather."""
    import datetime
    import json
    import pathlib

    import torch
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    tdist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=10))
    import clo_fast.data.translate as translate_module
    from clo_fast.config import load_config
    from clo_fast.train import Run

    fake = SlowCachedTranslator(pathlib.Path(tmp) / "cache" / "translations.sqlite", seconds_per_text=0.05)
    translate_module.make_translator = lambda cfg, progress=True: fake
    cfg = load_config(pathlib.Path(tmp) / "run.yaml")
    run = Run(cfg, pathlib.Path(tmp) / "run.yaml", None)
    run.device = torch.device("cpu")  # set by Run.setup, skipped here: the data stage picks the packing for it
    run.out_dir = pathlib.Path(tmp) / "run"  # also set by Run.setup (the data stage writes its rejects file there)
    run.out_dir.mkdir(exist_ok=True)
    collectives = []
    names = [n for n in COLLECTIVES if hasattr(tdist, n)]
    originals = {n: getattr(tdist, n) for n in names}
    for n in names:
        setattr(tdist, n, lambda *a, _n=n, **k: collectives.append(_n) or originals[_n](*a, **k))
    tdist.barrier()  # both ranks start the data stage together (outside it: not counted)
    collectives.clear()
    try:
        run.data()
    finally:
        held = list(collectives)
        for n in names:
            setattr(tdist, n, originals[n])
    tdist.barrier()
    counts = [None] * world
    tdist.all_gather_object(counts, (len(fake.translated), len(run.train_ds), held))
    if rank == 0:
        pathlib.Path(out_dir, "result.json").write_text(json.dumps(counts))
    tdist.destroy_process_group()


@pytest.mark.slow
def test_data_stage_holds_no_collective_and_shares_translation(tmp_path, llama3_tok):
    import json
    import socket

    import torch.multiprocessing as mp

    tok_dir = tmp_path / "tok"
    llama3_tok.save_pretrained(tok_dir)
    (tmp_path / "run.yaml").write_text(
        f"model: {{name_or_path: {tok_dir}}}\n"
        f"data: {{translator: hf, target_lang: sw, max_examples: 120, cache_dir: {tmp_path / 'cache'}, "
        f"output_dir: {tmp_path / 'data'}, template: chat, quality: {{enabled: false}}}}\n"  # the stand-in copies
        f"train: {{output_dir: {tmp_path / 'run'}}}\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_prepare_in_world, args=(2, port, str(tmp_path), str(tmp_path)), nprocs=2, start_method="spawn")
    (n0, train0, held0), (n1, train1, held1) = json.loads((tmp_path / "result.json").read_text())
    assert held0 == held1 == []  # no collective in the data stage, on either rank
    n_texts = 240  # 120 pairs of distinct texts
    assert train0 == train1 > 0
    # the two ranks shared the work: each translated a good part, together about all (little overlap)
    assert n0 >= n_texts // 3 and n1 >= n_texts // 3 and n_texts <= n0 + n1 <= n_texts + 4 * 16 * 2


class TaggingTranslator:
    """A translator stand-in: '[sw] ' + text (build_text_dataset only calls translate / translate_pairs)."""

    name = "tagging-fake"

    def translate(self, texts):
        return [f"[sw] {t}" for t in texts]

    def translate_pairs(self, pairs, src, tgt):
        out = self.translate([p.instruction for p in pairs] + [p.response for p in pairs])
        return list(zip(out[: len(pairs)], out[len(pairs) :], strict=True))


def _msg(mid, parent, role, text, rank=None):
    return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank, "lang": "en"}


def _threads(n: int, *, copy_of_first: bool = False) -> list[dict]:
    """n trees, each: a distinct question, its answer, then the same follow-up question and a reply."""
    rows = []
    for k in range(n):
        rows += [
            _msg(f"q{k}", None, "prompter", f"Question number {k}?"),
            _msg(f"a{k}", f"q{k}", "assistant", f"Answer number {k}.", 0),
            _msg(f"f{k}", f"a{k}", "prompter", "Thanks! Can you elaborate?"),
            _msg(f"r{k}", f"f{k}", "assistant", f"More about {k}.", 0),
        ]
    if copy_of_first:  # the first thread again, other ids, other case and spacing: a true duplicate of both turns
        rows += [
            _msg("Q", None, "prompter", "question  number 0?"),
            _msg("A", "Q", "assistant", "ANSWER number 0.", 0),
            _msg("F", "A", "prompter", "thanks!  can you elaborate?"),
            _msg("R", "F", "assistant", "Other reply.", 0),
        ]
    return rows


def _build(tmp_path, rows):
    src = tmp_path / "oasst.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(
        source=str(src),
        source_format="oasst",
        oasst_all_turns=True,
        translator="hf",
        target_lang="sw",
        eval_fraction=0.0,
        cache_dir=str(tmp_path / "cache"),
        output_dir=str(tmp_path / "out"),
        quality=QualitySettings(enabled=False),  # the stand-in's "[sw] " copies would be dropped by the gate
    )
    return build_text_dataset(cfg, translator=TaggingTranslator(), progress=False)


def test_a_shared_follow_up_in_different_conversations_is_not_a_duplicate(tmp_path):
    dsd, summary = _build(tmp_path, _threads(5))
    rows = list(dsd["train"])
    assert summary["duplicate_prompts_removed"] == 0
    assert len(rows) == 10
    follow_ups = [r for r in rows if r["prompt_en"] == "Thanks! Can you elaborate?"]
    assert len(follow_ups) == 5
    contexts = {json.loads(r["context_en"])[0]["content"] for r in follow_ups}
    assert contexts == {f"Question number {k}?" for k in range(5)}


def test_a_copy_of_a_whole_conversation_is_still_removed(tmp_path):
    dsd, summary = _build(tmp_path, _threads(3, copy_of_first=True))
    assert summary["duplicate_prompts_removed"] == 2  # the copied root question and its copied follow-up
    assert len(dsd["train"]) == 6


def test_a_context_that_differs_only_by_case_and_spacing_is_the_same():
    from clo_fast.data.split import conversation_key

    ctx = [{"role": "user", "content": "Hello  there"}, {"role": "assistant", "content": "Hi!"}]
    same = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "HI!"}]
    swapped = [{"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Hi!"}]
    assert conversation_key(ctx, "More?") == conversation_key(same, " more? ")
    assert conversation_key(ctx, "More?") != conversation_key(swapped, "More?")
    assert conversation_key(ctx, "More?") != conversation_key(None, "More?")
