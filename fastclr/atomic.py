"""Crash-safe file writes: a reader (or the next start after a kill) sees the old content or the new, never a mix.

The bytes go to a temporary file in the same folder, are flushed and fsynced, and ``os.replace`` swaps the file in
(atomic on one filesystem); the folder is fsynced after the rename, since without that a power loss can bring the old
file back. Used by checkpoints, the backbone export, the run's ``config.yaml`` and the bad-sample lists.
"""
from __future__ import annotations

import io
import os
import tempfile


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (creating its folder if needed)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes files owner-only; checkpoints and exports are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(d)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def torch_save(obj, path: str) -> None:
    """``torch.save`` through :func:`write_bytes`."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())
