"""clo_fast/evaluate/answers.py: echoes and loops, written by hand and drawn at random, fail fidelity; real answers
(restating the question included) pass."""

from __future__ import annotations

import random

import pytest

from clo_fast.evaluate.answers import answer_flags, is_echo, is_loop, repeated_trigram_share
from clo_fast.evaluate.report import response_metrics

SW_Q = "Mto mrefu zaidi duniani ni upi?"

# (prompt, answer, echo, loop): the issue's own observations first
CASES = [
    (SW_Q, "Mto mrefu zaidi duniani ni upi.", True, False),
    (SW_Q, "mto MREFU zaidi duniani ni upi? mto mrefu zaidi duniani ni upi", True, True),  # an echo, twice
    (SW_Q, "Mto mrefu zaidi duniani ni Mto Nile, wenye urefu wa kilomita 6,650.", False, False),
    ("Mimea inahitaji nini ili ikue?", "Mimea inahitaji ili ikue ili ili ili ili ili", True, True),
    (
        "Mimea inahitaji nini ili ikue?",
        "Mimea inahitaji maji, mwanga wa jua na udongo wenye rutuba ili ikue.",
        False,
        False,
    ),
    (
        "What is the tallest mountain in the world?",
        "The tallest mountain in the world is the Earth's mountain is the tallest is the highest is the tallest is the "
        "highest is the tallest",
        False,
        True,
    ),
    (
        "What is the capital of France?",
        "The capital of the United States is the capital of the country is the capital of the country is the capital",
        False,
        True,
    ),
    ("What is the capital of France?", "The capital of France is Paris.", False, False),
    ("Is the sky blue or green?", "Blue.", False, False),  # short answers of the prompt's words are no echo
    ("Rangi ya Zorblax ni gani?", "Rangi ya Zorblax ni nyekundu.", False, False),  # restating + the answer
    ("Andika shairi", "kama kama kama kama", False, True),
    ("富士山の高さは?", "富士山の高さは?", True, False),  # scripts without spaces: one word per character
    ("富士山の高さは?", "富士山の高さは3776メートルです。", False, False),
    # a loop inside one word, which the word rules see as one long word (SmolLM2 at lr 1e-4 wrote this)
    ("Kipimajoto hupima nini?", "Kipimajoto hupima nini, kabirimajimimimimimimimimimimi", False, True),
    ("What is a million?", "A million is 1000000, written with six zeros......", False, False),
    ("Spell the river.", "Mississippi: M-i-s-s-i-s-s-i-p-p-i.", False, False),
]


@pytest.mark.parametrize(("prompt", "answer", "echo", "loop"), CASES)
def test_hand_made_echoes_and_loops(prompt, answer, echo, loop):
    assert is_echo(prompt, answer) is echo
    assert is_loop(answer) is loop


def test_a_faithful_answer_is_in_the_language_and_neither_echo_nor_loop():
    assert answer_flags(SW_Q, "Mto Nile ndio mrefu zaidi.", "sw", "sw")["faithful"]
    assert not answer_flags(SW_Q, "Mto Nile ndio mrefu zaidi.", "sw", "en")["faithful"]
    assert not answer_flags(SW_Q, SW_Q, "sw", "sw")["faithful"]
    assert not answer_flags(SW_Q, "ni ni ni ni ni", "sw", "sw")["faithful"]


def test_random_loops_and_echoes_are_caught(rng):
    vocab = [f"w{i}" for i in range(40)]
    for _ in range(200):
        phrase = rng.sample(vocab, rng.randint(1, 4))
        loop = " ".join(rng.sample(vocab, rng.randint(0, 5)) + phrase * rng.randint(3, 12))
        assert is_loop(loop), loop
        prompt_words = rng.sample(vocab, rng.randint(3, 15))
        half = max(3, -(-len(prompt_words) // 2))  # an echo copies at least half the prompt (ECHO_MIN_COVER)
        echo = " ".join(prompt_words[: rng.randint(half, len(prompt_words))])
        assert is_echo(" ".join(prompt_words), echo)
        fresh = " ".join(rng.sample([f"x{i}" for i in range(100)], rng.randint(1, 30)))  # no repeats, no overlap
        assert not is_loop(fresh) and not is_echo(" ".join(prompt_words), fresh)


def test_repeated_trigram_share_against_a_count():
    r = random.Random(7)
    for _ in range(50):
        toks = [r.choice("abc") for _ in range(r.randint(0, 30))]
        grams = [tuple(toks[i : i + 3]) for i in range(len(toks) - 2)]
        expected = sum(g in grams[:i] for i, g in enumerate(grams)) / len(grams) if grams else 0.0
        assert repeated_trigram_share(toks) == pytest.approx(expected)


def test_report_counts_echoes_loops_and_the_cap():
    items = [{"lang": "sw", "prompt": SW_Q}] * 4
    gens = [
        {"text": SW_Q, "tokens": 8, "finished": True},
        {"text": "ili ili ili ili ili ili", "tokens": 64, "finished": False},
        {"text": "Mto Nile ndio mrefu zaidi duniani.", "tokens": 9, "finished": True},
        {"text": "The Nile.", "tokens": 3, "finished": True},
    ]
    m = response_metrics(items, gens, ["sw", "sw", "sw", "en"])["sw"]
    assert m["language_match"] == 0.75 and m["fidelity"] == 0.25
    assert m["echo_rate"] == 0.25 and m["loop_rate"] == 0.25 and m["finished_share"] == 0.75
