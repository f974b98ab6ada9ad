"""clo_fast's messages: one `clo_fast` logger, set up once, writing `[train] ...`-style lines to stderr.

    log = get_logger("train")     # logger `clo_fast.train`; its lines start with "[train] "
    log.info("resumed from ...")  # get_logger() alone: the package logger, lines without a prefix

The level: `--log-level` (every entry point has it, `add_log_level_argument`), else the environment variable
CLO_FAST_LOG_LEVEL, else info — warning on ranks > 0 (RANK / LOCAL_RANK as the launchers set them), so N ranks
do not repeat rank 0's progress. A command's output (result tables, printed paths, --help) is not a message: it is
printed to stdout, and stays there for pipes and scripts. Standard library only (the facts layer).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

ROOT = "clo_fast"
ENV = "CLO_FAST_LOG_LEVEL"
LEVELS = ("debug", "info", "warning", "error")


def process_rank() -> int:
    """This process's rank as the launcher set it (deepspeed, torchrun); 0 without one."""
    for key in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(key, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


class _StderrHandler(logging.Handler):
    """Writes to sys.stderr as it is when the record comes (not as it was at set-up): a later redirect, or
    pytest's capture, sees every line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream, line = sys.stderr, self.format(record)
            bars = getattr(sys.modules.get("tqdm"), "tqdm", None)  # only if something imported tqdm already
            if bars is not None:  # tqdm's bars share stderr: lift them, write the line, redraw them below it
                bars.write(line, file=stream)
            else:
                stream.write(line + "\n")
            stream.flush()  # lines of several ranks, and of a child and its parent, interleave whole
        except Exception:
            self.handleError(record)


class _Formatter(logging.Formatter):
    """`[tag] message`, the tag being the logger's name below `clo_fast` (none for the package logger); a rank
    other than 0 is named in it, so a line from rank 1 is not taken for rank 0's."""

    def format(self, record: logging.LogRecord) -> str:
        tag = record.name[len(ROOT) + 1 :] if record.name.startswith(ROOT + ".") else ""
        r = process_rank()
        if r:
            tag = f"{tag} rank {r}".strip()
        return (f"[{tag}] " if tag else "") + super().format(record)


_handler: _StderrHandler | None = None


def resolve_level(level: str | None = None) -> tuple[int, str | None]:
    """(the level, a note when CLO_FAST_LOG_LEVEL held no level name) for `level` (the flag's value, or None)."""
    note = None
    name = level
    if name is None:
        env = os.environ.get(ENV, "").strip().lower()
        if env in LEVELS:
            name = env
        elif env:
            note = f"{ENV}={os.environ[ENV]!r} is not one of {', '.join(LEVELS)}: ignored"
    if name is None:
        name = "info" if process_rank() == 0 else "warning"
    return getattr(logging, name.upper()), note


def setup_logging(level: str | None = None) -> logging.Logger:
    """(Re)configures the `clo_fast` logger: one stderr handler, not passed on to the root logger (the host
    application's or a library's handlers would print each line twice). Entry points call it with their
    --log-level; a library user who never calls it gets the default on the first get_logger()."""
    global _handler
    logger = logging.getLogger(ROOT)
    lvl, note = resolve_level(level)
    if _handler is None:
        _handler = _StderrHandler()
        _handler.setFormatter(_Formatter("%(message)s"))
    if _handler not in logger.handlers:
        logger.addHandler(_handler)
    logger.setLevel(lvl)
    logger.propagate = False
    if note:
        logger.warning(note)
    return logger


def get_logger(name: str | None = None) -> logging.Logger:
    """The logger `clo_fast.<name>` (the package logger without a name), set up with the default level first if
    no entry point has done it."""
    if _handler is None:
        setup_logging()
    return logging.getLogger(f"{ROOT}.{name}" if name else ROOT)


def add_log_level_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--log-level",
        choices=LEVELS,
        default=None,
        help=f"messages shown on stderr (default: env {ENV}, else info; warning on ranks > 0)",
    )
