"""Sequences of strings without a Python object per item: what the sample index (:mod:`fastclr.data.index`) keeps
for a million names or paths, built on access."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class Table(Sequence):
    """A read-only sequence built on access; equal to any sequence of the same items (a list, say)."""

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None


class Strings(Table):
    """A read-only sequence of strings stored as one UTF-8 byte array and int64 end offsets (no Python objects)."""

    def __init__(self, blob: np.ndarray, ends: np.ndarray):
        self.blob, self.ends = blob, ends

    @classmethod
    def of(cls, items) -> "Strings":
        encoded = [s.encode() for s in items]
        ends = np.cumsum([len(b) for b in encoded], dtype=np.int64) if encoded else np.zeros(0, np.int64)
        return cls(np.frombuffer(b"".join(encoded), np.uint8), ends)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i: int) -> str:
        i = int(i)
        if i < 0:
            i += len(self)
        start = int(self.ends[i - 1]) if i > 0 else 0
        return self.blob[start:int(self.ends[i])].tobytes().decode()

    def take(self, keep) -> "Strings":
        return Strings.of(self[i] for i in keep)
