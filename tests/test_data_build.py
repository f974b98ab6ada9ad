"""Deduplication of source pairs (clo_fast.data.build.select_pairs): a prompt is the same prompt only with the same
conversation before it, so oasst's every-turn pairs with a common follow-up ("Thanks! Can you elaborate?") in
different threads are all kept, and true copies are still removed."""

from __future__ import annotations

import json

from clo_fast.config import DataConfig
from clo_fast.data import build_text_dataset


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
