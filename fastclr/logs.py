"""The run's console lines: the standard ``logging`` module under the name ``fastclr``, rank-aware.

Rank 0 prints information; every rank prints warnings and errors (a bad image, a rank that stops), so a problem on
rank 5 is not lost; messages that only some ranks print name their rank themselves. Lines go to stdout as
``fastclr: <message>``, flushed, the form the batch logs and the tests read. Library modules call ``log = logging.getLogger(__name__)`` as usual; their
records reach this handler through the ``fastclr`` parent logger.
"""
from __future__ import annotations

import logging
import sys

LOGGER = "fastclr"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


class _Flushing(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at each record (tests swap it); StreamHandler flushes every line."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup(rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """Install (or re-target) the console handler of the ``fastclr`` logger for this process's rank."""
    log = logging.getLogger(LOGGER)
    for h in list(log.handlers):
        if isinstance(h, _Flushing):
            log.removeHandler(h)
    handler = _Flushing()
    handler.setFormatter(logging.Formatter("fastclr: %(message)s"))
    handler.addFilter(_RankFilter(rank))
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = False
    return log


def get() -> logging.Logger:
    return logging.getLogger(LOGGER)
