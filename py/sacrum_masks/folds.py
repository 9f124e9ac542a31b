"""Folds as nnU-Net users know them (``FOLD`` in make, ``--fold`` in the CLIs, ``Fold`` in sidecars).

* ``0`` .. ``4`` (any non-negative integer nnU-Net's ``splits_final.json`` holds): one fold.
* ``"0 1 2 3 4"`` (spaces or commas): a list. Training trains each fold; stage 4 runs one ensemble, the
  probabilities averaged as ``nnUNetv2_predict -f 0 1 2 3 4`` does.
* ``all``: nnU-Net's train-on-every-case fold, folder ``fold_all``.

One vocabulary for every stage: :func:`parse_folds` reads it, :func:`format_folds` writes it back (sidecars,
logs), :func:`fold_dir` names the folder, :func:`check_folds` says which folds a model lacks.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import InputError

Fold = int | str


def parse_folds(text: str | int | list | tuple) -> tuple[Fold, ...]:
    """The folds of a ``FOLD`` value, in the given order, duplicates dropped.

    >>> parse_folds("0"), parse_folds("0 1 2"), parse_folds("3,1"), parse_folds("all"), parse_folds(2)
    ((0,), (0, 1, 2), (3, 1), ('all',), (2,))
    >>> parse_folds(["0", 1]), parse_folds("1 1")
    ((0, 1), (1,))
    >>> parse_folds("0-4")
    Traceback (most recent call last):
    ...
    ValueError: FOLD=0-4: expected fold numbers (0 to 4, e.g. 0 or "0 1 2 3 4") or all
    >>> parse_folds("")
    Traceback (most recent call last):
    ...
    ValueError: FOLD=: expected fold numbers (0 to 4, e.g. 0 or "0 1 2 3 4") or all
    """
    if isinstance(text, (list, tuple)):
        parts = [str(p).strip() for p in text]
    else:
        parts = [p for p in re.split(r"[\s,]+", str(text).strip()) if p]
    out: list[Fold] = []
    for part in parts:
        if part == "all":
            fold: Fold = "all"
        elif re.fullmatch(r"[0-9]{1,2}", part):
            fold = int(part)
        else:
            parts = []
            break
        if fold not in out:
            out.append(fold)
    if not parts:
        raise ValueError(f'FOLD={text if not isinstance(text, (list, tuple)) else " ".join(map(str, text))}: '
                         'expected fold numbers (0 to 4, e.g. 0 or "0 1 2 3 4") or all')
    return tuple(out)


def format_folds(folds) -> str:
    """The text form of folds (what sidecars and logs record; :func:`parse_folds` reads it back).

    >>> format_folds((0,)), format_folds((0, 1, 2)), format_folds(("all",)), format_folds("1,2")
    ('0', '0 1 2', 'all', '1 2')
    """
    if isinstance(folds, (str, int)):
        folds = parse_folds(folds)
    return " ".join(str(f) for f in folds)


def fold_dir(model_dir: str | Path, fold: Fold) -> Path:
    """nnU-Net's folder of one fold: ``<model>/fold_<F>`` (``fold_all`` for ``all``).

    >>> fold_dir("/m", 0).as_posix(), fold_dir("/m", "all").as_posix()
    ('/m/fold_0', '/m/fold_all')
    """
    return Path(model_dir) / f"fold_{fold}"


def available_folds(model_dir: str | Path, checkpoint: str = "final") -> list[Fold]:
    """The folds of a model folder that hold ``checkpoint_<checkpoint>.pth``, numbers first, then ``all``."""
    found: list[Fold] = []
    for path in Path(model_dir).glob(f"fold_*/checkpoint_{checkpoint}.pth"):
        name = path.parent.name[len("fold_"):]
        if name == "all":
            found.append("all")
        elif name.isdigit():
            found.append(int(name))
    return sorted(found, key=lambda f: (isinstance(f, str), f if isinstance(f, int) else 0))


def check_folds(model_dir: str | Path, folds, checkpoint: str) -> list[Path]:
    """The checkpoint files of ``folds``, or one InputError naming the folds that are there.

    The model folder must hold ``dataset.json`` and ``plans.json``.
    """
    model_dir = Path(model_dir)
    for name in ("dataset.json", "plans.json"):
        if not (model_dir / name).is_file():
            raise InputError(model_dir, f"not an nnU-Net model folder (no {name})")
    folds = parse_folds(folds) if isinstance(folds, (str, int)) else tuple(folds)
    missing = [f for f in folds if not (fold_dir(model_dir, f) / f"checkpoint_{checkpoint}.pth").is_file()]
    if missing:
        have = available_folds(model_dir, checkpoint)
        there = f"folds with checkpoint_{checkpoint}.pth: {format_folds(have)}" if have else \
            f"no fold has checkpoint_{checkpoint}.pth"
        raise InputError(model_dir, f"fold {format_folds(missing)} not there ({there})")
    return [fold_dir(model_dir, f) / f"checkpoint_{checkpoint}.pth" for f in folds]
