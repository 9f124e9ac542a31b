"""Back into training: the masks a review passed, plus the manual corrections found beside them.

``review.tsv`` is what the QC page exports (:mod:`sacrum_masks.qc_page`): a header ``mask decision flags
date`` and one row per marked mask, ``mask`` relative to the folder holding the datasets
(``DATASETS_PATH``), ``decision`` one of ``pass``, ``fail``, ``artifact``.

:func:`reviewed_labels` picks the next round's training labels:

* a mask marked **pass** is kept;
* a mask marked **fail** or **artifact** is left out, unless it has since been corrected by hand;
* every manual correction in the derivatives folders the review covers is added: a mask (same suffix as the
  reviewed ones) without our sidecar, or whose sidecar's last ``GeneratedBy`` entry is not ours
  (spinalcordtoolbox/manual-correction appends ``{"Author", "Date"}``; see
  :func:`sacrum_masks.qc.sidecar_kind`);
* a row naming a mask that no longer exists, or whose image is gone, is one line on stderr and left out.
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath

from .bids import BidsName
from .errors import InputError

REVIEW_COLUMNS = ("mask", "decision", "flags", "date")
DECISIONS = ("pass", "fail", "artifact")


def read_review(path: Path) -> list[dict]:
    """The rows of a review.tsv; InputError naming the file and line for a malformed one.

    >>> import tempfile, os
    >>> p = Path(tempfile.mkdtemp()) / "review.tsv"
    >>> _ = p.write_text("mask\\tdecision\\tflags\\tdate\\nds/derivatives/labels/sub-1/anat/x.nii.gz\\tpass\\t\\t2026\\n")
    >>> [r["decision"] for r in read_review(p)]
    ['pass']
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    lines = text.splitlines()
    if not lines or tuple(lines[0].split("\t")) != REVIEW_COLUMNS:
        raise InputError(path, "not a review.tsv (first line must be: " + "\\t".join(REVIEW_COLUMNS) + ")")
    rows = []
    for n, rec in enumerate(csv.reader(lines[1:], delimiter="\t", quoting=csv.QUOTE_NONE), 2):
        if not rec or not "".join(rec).strip():
            continue
        if len(rec) != len(REVIEW_COLUMNS):
            raise InputError(path, f"line {n}: {len(rec)} columns, expected {len(REVIEW_COLUMNS)}")
        row = dict(zip(REVIEW_COLUMNS, rec))
        if row["decision"] not in DECISIONS:
            raise InputError(path, f"line {n}: decision {row['decision']!r} is not one of {', '.join(DECISIONS)}")
        mask = PurePosixPath(row["mask"])
        if mask.is_absolute() or ".." in mask.parts or len(mask.parts) < 4:
            raise InputError(path, f"line {n}: mask {row['mask']!r} must be <dataset>/derivatives/<name>/... "
                                   "relative to DATASETS_PATH")
        rows.append(row)
    return rows


def _suffix_of(name: str) -> tuple[str, ...]:
    from .config import label_suffix

    suffix = label_suffix(BidsName.parse(name))
    if suffix is None:
        raise InputError(name, "not a label file name (expected <image stem>_seg or _label-sacrum_seg)")
    return suffix


def is_manual(mask: Path) -> bool:
    """True when ``mask`` is a manual correction (see the module docstring)."""
    from .qc import read_sidecar, sidecar_kind

    sidecar, readable = read_sidecar(mask)
    return sidecar_kind(sidecar, readable) == "manual"


def reviewed_labels(review: Path, root: Path, warn=print) -> tuple[list[Path], dict]:
    """(label paths for the next config, counts) from a review.tsv and the datasets under ``root``.

    ``warn`` receives one line per reviewed mask that no longer exists (or whose image is gone).
    Counts: ``passed``, ``corrected``, ``left_out`` (fail/artifact), ``missing``.
    """
    from .bids import iter_anat_files
    from .config import image_from_label

    rows = read_review(review)
    root = Path(root)
    chosen: dict[Path, str] = {}
    counts = {"passed": 0, "corrected": 0, "left_out": 0, "missing": 0}
    folders: dict[Path, set[tuple[str, ...]]] = {}
    for row in rows:
        mask = root / row["mask"]
        parts = PurePosixPath(row["mask"]).parts
        folders.setdefault(root.joinpath(*parts[:3]), set()).add(_suffix_of(mask.name))
        if not mask.is_file():
            warn(f"{review}: {row['mask']}: no longer exists (left out)")
            counts["missing"] += 1
            continue
        if not image_from_label(mask).is_file():
            warn(f"{review}: {row['mask']}: its image {image_from_label(mask)} no longer exists (left out)")
            counts["missing"] += 1
            continue
        if row["decision"] == "pass":
            chosen[mask] = "passed"
        elif is_manual(mask):
            chosen[mask] = "corrected"
        else:
            counts["left_out"] += 1
    for folder, suffixes in sorted(folders.items()):
        if not folder.is_dir():
            continue
        for path, bn in iter_anat_files(folder):
            if path in chosen or not any(bn.parts[-len(s):] == s and len(bn.parts) > len(s) for s in suffixes):
                continue
            if path.is_file() and is_manual(path):
                if image_from_label(path).is_file():
                    chosen[path] = "corrected"
                else:
                    warn(f"{path}: manual correction without its image {image_from_label(path)} (left out)")
    for how in chosen.values():
        counts[how] += 1
    return sorted(chosen), counts
