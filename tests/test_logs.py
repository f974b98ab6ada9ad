"""clo_fast.logs: the level (--log-level, CLO_FAST_LOG_LEVEL, the rank's default), the `[tag] message` lines on
stderr, and the flag on every entry point."""

from __future__ import annotations

import logging

import pytest

from clo_fast import logs


@pytest.fixture(autouse=True)
def default_logging(monkeypatch):
    """Each test starts from rank 0 with no level asked for, and leaves the default set up for the tests after it."""
    for key in ("RANK", "LOCAL_RANK", logs.ENV):
        monkeypatch.delenv(key, raising=False)
    yield
    monkeypatch.undo()
    logs.setup_logging()


def test_rank0_shows_info_and_the_other_ranks_warnings_unless_a_level_is_given(monkeypatch):
    assert logs.resolve_level() == (logging.INFO, None)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun / deepspeed set it with RANK; LOCAL_RANK alone counts too
    assert logs.resolve_level()[0] == logging.WARNING
    monkeypatch.setenv("RANK", "3")
    assert logs.process_rank() == 3 and logs.resolve_level()[0] == logging.WARNING
    monkeypatch.setenv(logs.ENV, "DEBUG")  # given explicitly: every rank, in any case
    assert logs.resolve_level()[0] == logging.DEBUG
    assert logs.resolve_level("error")[0] == logging.ERROR  # the flag wins over the variable


def test_a_bad_environment_level_is_named_and_the_default_kept(monkeypatch, capsys):
    monkeypatch.setenv(logs.ENV, "loud")
    level, note = logs.resolve_level()
    assert level == logging.INFO and f"{logs.ENV}='loud'" in note
    logs.setup_logging()
    assert "is not one of debug, info, warning, error: ignored" in capsys.readouterr().err


def test_lines_carry_the_loggers_tag_and_a_nonzero_rank_and_go_to_stderr(monkeypatch, capsys):
    logs.setup_logging("info")
    logs.get_logger("train").info("final metrics: loss 0.5")
    logs.get_logger().error("error: no such file")
    logs.get_logger("train").debug("not shown at info")
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err == "[train] final metrics: loss 0.5\nerror: no such file\n"
    monkeypatch.setenv("RANK", "1")
    logs.setup_logging()  # rank 1's default: warnings and errors only
    logs.get_logger("train").info("rank 0 says this")
    logs.get_logger("train").warning("test crash at after_step:3")
    assert capsys.readouterr().err == "[train rank 1] test crash at after_step:3\n"


def test_set_up_twice_keeps_one_handler_and_prints_each_line_once(capsys):
    logs.setup_logging("info")
    logs.setup_logging("debug")
    ours = [h for h in logging.getLogger("clo_fast").handlers if isinstance(h, logs._StderrHandler)]
    assert len(ours) == 1 and not logging.getLogger("clo_fast").propagate  # (pytest adds capture handlers of its own)
    logs.get_logger("compare").debug("x")
    assert capsys.readouterr().err == "[compare] x\n"


@pytest.mark.parametrize(
    ("module", "function"),
    [
        ("clo_fast.train", "parse_args"),
        ("clo_fast.compare", "parse_args"),
        ("clo_fast.data.cli", "main"),
        ("clo_fast.evaluate.cli", "main"),
        ("clo_fast.merge_adapter", "main"),
        ("clo_fast.world", "main"),
        ("clo_fast.demo_model", "main"),
    ],
)
def test_every_entry_point_takes_log_level(module, function, capsys):
    import importlib

    with pytest.raises(SystemExit) as e:
        getattr(importlib.import_module(module), function)(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--log-level {debug,info,warning,error}" in text, text


def test_clo_fast_train_passes_log_level_to_the_script(capsys):
    from clo_fast import cli

    assert cli.main(["train", "--dry-run", "--log-level", "warning", "--config", "demo"]) == 0
    assert capsys.readouterr().out.strip().endswith("train.py --log-level warning --config demo")
