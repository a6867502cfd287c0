"""The bad images a rank skipped, told to its user: a warning naming the new ones at each log step and the whole list
rewritten to ``<output>/bad_samples.rank<R>.tsv``."""
from __future__ import annotations

import logging
import os

from . import atomic

log = logging.getLogger(__name__)


class BadSampleReport:
    """Names the bad images one rank met since the last report and rewrites its list of all of them
    (``<run_dir>/bad_samples.rank<R>.tsv``)."""

    SHOWN = 5

    def __init__(self, bad, run_dir: str, rank: int):
        self.bad, self.rank = bad, rank
        self.path = os.path.join(run_dir, f"bad_samples.rank{rank}.tsv")

    def __call__(self) -> None:
        fresh = self.bad.new_since_last_call()
        if not fresh:
            return
        everything = self.bad.names()
        atomic.write_text(self.path, "".join(f"{name}\t{reason}\n" for name, reason in everything))
        for name, reason in fresh[:self.SHOWN]:
            log.warning(f"rank {self.rank}: skipped bad image {name}: {reason}")
        more = f" ({len(fresh) - self.SHOWN} more)" if len(fresh) > self.SHOWN else ""
        log.warning(f"rank {self.rank}: {len(everything)} bad image(s) skipped so far{more}, listed in {self.path}")
