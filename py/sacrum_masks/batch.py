"""Batch bookkeeping shared by the stages: one log line per item, a summary, an exit status; locks."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
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
        #: every reported item in order: {"item": str, "status": str, "detail": str}
        self.records: list[dict[str, str]] = []

    def report(self, item, status: str, detail: str = "") -> None:
        self.counts[status] += 1
        self.records.append({"item": str(item), "status": status, "detail": detail})
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

    def write_report(self, path: str | Path, order: list[str], **extra) -> Path:
        """Write the batch as JSON (atomically): ``extra`` fields, ``counts`` (``order`` first, zeros
        included), ``exit_status`` and ``items`` (every reported item with its status and detail)."""
        from .nifti import write_json_atomic

        keys = list(order) + sorted(k for k in self.counts if k not in order)
        return write_json_atomic({"command": self.name, **extra,
                                  "counts": {k: self.counts.get(k, 0) for k in keys},
                                  "exit_status": self.exit_code, "items": self.records}, path)


@contextlib.contextmanager
def folder_lock(folder: str | Path, *, wait: bool = False, name: str = ".sacrum-masks.lock",
                shared: bool = False, lock_dir: str | Path | None = None):
    """Hold an exclusive (or, with ``shared``, a shared) ``flock`` on ``<folder>/<name>`` for the block.

    Raises :class:`LockBusy` at once when another process holds it in a conflicting mode and ``wait``
    is false. The lock dies with its process (a SIGKILLed run never leaves a stale lock).
    With ``lock_dir`` the lock file is ``<lock_dir>/<name>.<sha256 of the folder's path>`` instead (for a
    folder on a file system without flock; ``lock_dir`` must be local, so only runs on its node exclude
    each other). A file system without flock raises
    :class:`~sacrum_masks.claims.LockUnsupported` (one line naming the folder, exit status 2).
    """
    from .claims import flock

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if lock_dir is None:
        where, path = folder, folder / name
    else:
        where = Path(lock_dir)
        where.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256(os.path.abspath(folder).encode("utf-8", "surrogateescape")).hexdigest()
        path = where / f"{name}.{key}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        if not flock(fd, mode, where):
            raise LockBusy(f"{folder}: another run holds {path}")
        if not shared:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        os.close(fd)
