"""Per-image claims: two runs never write the same output at once, whatever their shards.

A claim is an exclusive ``flock`` on a small file named after the SHA-256 of the output's absolute path,
so it does not depend on how the image list was cut (``--shard 1/4`` and ``--shard 1/8`` claim the same
file for the same image). It is taken without waiting: an image claimed by another run is reported as
``busy`` and left to that run. Like every ``flock``, a claim dies with its process, so a SIGKILLed run
never leaves one behind, and a lock file is never deleted (deleting one races with its next holder).

Where the lock files live:

* by default ``<output folder>/.sacrum-masks-claims/`` (``derivatives/labels`` for stage 4), beside the
  outputs, so runs on different machines of a cluster see each other's claims (the shared file system
  must support ``flock``: Lustre mounted with ``-o flock``, NFSv4, GPFS, BeeGFS do);
* with ``lock_dir`` (``predict --lock-dir DIR``, env ``SACRUM_LOCK_DIR``) in ``DIR``, for a file system
  without ``flock`` (Lustre mounted ``-o noflock``/``localflock``): DIR must be local and flock-capable,
  so this protects only runs on that one node.

A file system without ``flock`` (ENOSYS, EOPNOTSUPP, ENOLCK) raises :class:`LockUnsupported`, an
:class:`~sacrum_masks.errors.InputError`: one line naming the folder, the mount option and ``--lock-dir``
(exit status 2 from the CLI), never a traceback.

Stale temporaries: the hidden ``.<name>.<random>.tmp<ext>`` files of :func:`sacrum_masks.nifti.atomic_path`
that a killed run left beside an output are removed only by a run that holds that output's claim
(:meth:`Claim.remove_stale_temporaries`): a writer always holds the claim while its temporary exists, so
under the claim every temporary is an orphan whose owner is gone.

API for a pipelined caller (the stage 4 engine): build one :class:`Claims` per run, then per job

>>> import tempfile, pathlib
>>> tmp = pathlib.Path(tempfile.mkdtemp())
>>> claims = Claims(lock_dir=tmp / "locks")
>>> out = tmp / "sub-01_T2w_label-sacrum_seg.nii.gz"
>>> claim = claims.try_claim(out, tmp)        # before reading the job's image; None: another run has it
>>> claims.try_claim(out, tmp) is None        # a second claim (here: this run's own) is refused
True
>>> claim.remove_stale_temporaries(out)       # only under the claim
>>> # ... plan again under the claim (up to date now?), read, predict, write atomically ...
>>> claim.release()                           # after the job's write (or its failure)
>>> claims.try_claim(out, tmp).release()      # free again

``try_claim`` refuses a second claim on the same output inside one process too (a ``flock`` belongs to
an open file, not to a process), so a pipeline that holds several claims at once keeps them apart. Claims may be held in any
number; take them in the jobs' sorted order (every run sorts the same way).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from pathlib import Path

from .errors import InputError

#: folder of the lock files inside an output folder (when no lock dir is given)
CLAIMS_FOLDER = ".sacrum-masks-claims"
#: errno values of a file system without flock (Lustre -o noflock: ENOSYS; NFS without lockd: ENOLCK)
NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)
_BUSY = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


class LockUnsupported(InputError):
    """The file system of a lock file has no ``flock``: one line naming the folder and what to do."""

    def __init__(self, folder: str | Path, exc: OSError):
        super().__init__(folder, f"this file system does not support flock ({os.strerror(exc.errno)}): "
                                 "mount it with flock support (Lustre: -o flock), or pass --lock-dir DIR "
                                 "(env SACRUM_LOCK_DIR) on a local file system (then only runs on that "
                                 "node exclude each other)")


def flock(fd: int, mode: int, folder: str | Path) -> bool:
    """``fcntl.flock(fd, mode)``; False when another holder conflicts (non-blocking mode).

    Raises :class:`LockUnsupported` on a file system without flock; other errors are bugs or I/O errors.
    """
    try:
        fcntl.flock(fd, mode)
    except OSError as exc:
        if exc.errno in _BUSY:
            return False
        if exc.errno in NO_FLOCK:
            raise LockUnsupported(folder, exc) from None
        raise
    return True


def claim_name(output: str | Path) -> str:
    """The lock file name of an output: the SHA-256 of its absolute path (no shard, no N in it).

    >>> claim_name("/d/derivatives/labels/sub-01/anat/x.nii.gz") == claim_name("/d/derivatives/labels/sub-01/anat/./x.nii.gz")
    True
    >>> len(claim_name("/a"))
    69
    """
    key = os.path.abspath(os.fspath(output)).encode("utf-8", "surrogateescape")
    return hashlib.sha256(key).hexdigest() + ".lock"


class Claim:
    """One held claim (an open, flocked file); :meth:`release` or the process's end frees it."""

    def __init__(self, output: Path, path: Path, fd: int):
        self.output, self.path, self._fd = output, path, fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def remove_stale_temporaries(self, *paths: str | Path) -> None:
        """Remove the temporaries a killed run left beside ``paths`` (the outputs this claim covers)."""
        from .nifti import remove_stale_temporaries

        if not self.held:
            raise RuntimeError(f"claim of {self.output} is released: its temporaries are not ours to remove")
        remove_stale_temporaries(*paths)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class Claims:
    """The claims of one run. ``lock_dir`` None: lock files inside each output folder (see the module)."""

    def __init__(self, lock_dir: str | Path | None = None):
        self.lock_dir = Path(lock_dir) if lock_dir is not None else None

    def folder_for(self, folder: str | Path) -> Path:
        """Where the lock files of outputs under ``folder`` (an output folder) live."""
        return self.lock_dir if self.lock_dir is not None else Path(folder) / CLAIMS_FOLDER

    def try_claim(self, output: str | Path, folder: str | Path) -> Claim | None:
        """Claim ``output`` (a file under the output folder ``folder``) without waiting.

        Returns the :class:`Claim`, or None when another run (or this one) holds it. Raises
        :class:`LockUnsupported` when the lock folder's file system has no flock.
        """
        output = Path(os.path.abspath(output))
        where = self.folder_for(folder)
        where.mkdir(parents=True, exist_ok=True)
        path = where / claim_name(output)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            got = flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, where)
        except BaseException:
            os.close(fd)
            raise
        if not got:
            os.close(fd)
            return None
        return Claim(output, path, fd)
