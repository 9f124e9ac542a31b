"""Exceptions that are reported to the user as one line (never a traceback)."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input or a user mistake: one line naming the file (or option) and the reason.

    Parameters
    ----------
    path : path-like or str
        The file, folder or option that is wrong.
    reason : str
        What is wrong with it, and where possible what to do.

    Examples
    --------
    >>> str(InputError("sub-01_T2w.nii.gz", "not a 3D image (shape (4, 4, 4, 2))"))
    'sub-01_T2w.nii.gz: not a 3D image (shape (4, 4, 4, 2))'
    """

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):
        """Pickled with its two arguments (it crosses from the stage 4 engine's worker processes).

        >>> import pickle; pickle.loads(pickle.dumps(InputError("a.nii.gz", "no such file"))).reason
        'no such file'
        """
        return type(self), (self.path, self.reason)


#: exit status of a run that found its output locked by another run (sysexits.h EX_TEMPFAIL: try again later)
EXIT_BUSY = 75


class LockBusy(Exception):
    """Another run holds the lock of an output folder (reported as one line, exit status :data:`EXIT_BUSY`)."""
