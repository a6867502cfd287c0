"""A job's data, indexed once before its ranks list it: rank 0 builds what is missing, the others wait."""
from __future__ import annotations

import os
import sys
import warnings

from .index import folder_table, tar_table
from .sources import detect_kind, folder_classes


def prepare(cfg, rt) -> None:
    """Index ``cfg.path`` and ``cfg.eval_path`` (a :class:`fastclr.config.DataConfig`) on rank 0 while the other
    ranks wait, so that a job builds each index once; then every rank memory-maps it when it lists its samples. The
    build runs in a child process (``fastclr data index``): what listing a million samples allocates leaves with it
    instead of staying resident in rank 0. A rank that cannot see rank 0's file (a node-local cache) builds its own."""
    if rt.rank == 0 and cfg.dataset != "digits":
        for path in (cfg.path, cfg.eval_path):
            kind = detect_kind(path) if (path and cfg.dataset == "auto") else cfg.dataset
            if not path or kind not in ("tar", "folder"):
                continue
            look = (lambda: tar_table(path, build=False)) if kind == "tar" else (
                lambda: folder_table(path, folder_classes(path), build=False))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a stale index: the child says so when it rebuilds it
                found = look()
            if found is None:
                _build_in_child(path, kind)
    if rt.world_size > 1:
        from ..runtime import barrier

        barrier()


def _build_in_child(path: str, kind: str) -> None:
    import subprocess

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a plain process, not a member of the job's world
    done = subprocess.run([sys.executable, "-m", "fastclr", "data", "index", "--kind", kind, path], env=env)
    if done.returncode != 0:
        raise RuntimeError(f"building the sample index of '{path}' failed (exit {done.returncode}; the reason is "
                           "printed above)")
