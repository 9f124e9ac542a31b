"""Batch bookkeeping shared by the stages: one log line per item, a summary, an exit status; locks."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
from collections import Counter
from pathlib import Path

from .errors import LockBusy


class Batch:
    """Counts items by status and prints one line per item.

    Statuses are free words ("written", "up to date", "kept", "failed", "skipped", ...);
    ``failed`` makes :attr:`exit_code` non-zero.

    >>> b = Batch("demo", stream=sys.stdout)
    >>> b.report("a.nii.gz", "written")
    demo: written  a.nii.gz
    >>> b.report("b.nii.gz", "failed", "no such file")
    demo: failed  b.nii.gz: no such file
    >>> b.summary(["written", "failed"])
    'demo: 1 written, 1 failed'
    >>> b.exit_code
    1
    """

    def __init__(self, name: str, stream=None):
        self.name = name
        self.counts: Counter[str] = Counter()
        self.stream = stream
        self.failures: list[str] = []

    def report(self, item, status: str, detail: str = "") -> None:
        self.counts[status] += 1
        if status == "failed":
            self.failures.append(f"{item}: {detail}" if detail else str(item))
        msg = f"{self.name}: {status}  {item}" + (f": {detail}" if detail else "")
        print(msg, file=self.stream or (sys.stderr if status == "failed" else sys.stdout), flush=True)

    def summary(self, order: list[str]) -> str:
        keys = list(order) + sorted(k for k in self.counts if k not in order)
        return f"{self.name}: " + ", ".join(f"{self.counts.get(k, 0)} {k}" for k in keys)

    @property
    def exit_code(self) -> int:
        return 1 if self.counts.get("failed", 0) else 0


@contextlib.contextmanager
def folder_lock(folder: str | Path, *, wait: bool = False, name: str = ".sacrum-masks.lock",
                shared: bool = False):
    """Hold an exclusive (or, with ``shared``, a shared) ``flock`` on ``<folder>/<name>`` for the block.

    Raises :class:`LockBusy` at once when another process holds it in a conflicting mode and ``wait``
    is false. The lock dies with its process (a SIGKILLed run never leaves a stale lock).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise LockBusy(f"{folder}: another run holds {path}") from None
            raise
        if not shared:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        os.close(fd)
