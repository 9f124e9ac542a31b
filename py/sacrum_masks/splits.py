"""nnU-Net's ``splits_final.json`` from the split config: fold 0 is the config, folds 1-4 are grouped by person.

nnU-Net v2 reads ``$nnUNet_preprocessed/Dataset<NNN>_<name>/splits_final.json`` (a list of
``{"train": [case, ...], "val": [case, ...]}``, one per fold) and, when it is absent, draws its own
random 5-fold split by *case*: one subject's T1w and T2w then land on both sides of a fold, and the
config's VALIDATION subjects land in fold 0's training list. Stage 3 writes the file before any
training instead (:func:`ensure_splits`):

* a **person** is ``(dataset, subject)``: ``sub-01`` of two datasets are two people;
* **fold 0** is exactly the config: ``train`` = its TRAINING cases, ``val`` = its VALIDATION cases;
* **folds 1-4** complete a 5-fold split of TRAINING + VALIDATION: the people not in VALIDATION are
  dealt (seeded by the config's ``SEED``, recorded by ``convert`` in ``conversion.json``) to four
  validation groups, dataset by dataset, each person to the group with the fewest people of its
  dataset so far (then the fewest cases), so every fold sees every dataset; each fold's ``train`` is
  every other case;
* a config **without VALIDATION** gets five such groups, fold 0 included;
* **fewer than 5 people**: no 5 grouped folds exist. Fold 0 (when the config has VALIDATION) and
  ``FOLD=all`` need none, so a file with fold 0 only is written when only those are asked for;
  otherwise one line says how many people there are, and nothing is written.

Case names are the nnU-Net case identifiers ``convert`` wrote (``conversion.json``: case id -> split
and source image ``<dataset>/sub-*/...``). A file that differs from what the config gives and that
we did not write (the stamp ``.sacrum-splits-sha256`` holds the SHA-256 of the file we wrote) was
edited by hand: it is kept and reported in one line, unless ``force``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path, PurePosixPath

from .bids import BidsName
from .errors import InputError
from .nifti import write_text_atomic

N_FOLDS = 5
SPLITS = "splits_final.json"
STAMP = ".sacrum-splits-sha256"


class SplitError(InputError):
    """No split can be made (too few people, no conversion record): one line."""


def person_of(image_rel: str) -> tuple[str, str]:
    """``(dataset, "sub-<label>")`` of an image path relative to DATASETS_PATH.

    >>> person_of("goldatlas/sub-03/anat/sub-03_T2w.nii.gz")
    ('goldatlas', 'sub-03')
    """
    path = PurePosixPath(image_rel)
    return path.parts[0], "sub-" + BidsName.parse(path.name).sub


def training_cases(conversion: dict) -> dict[str, tuple[str, tuple[str, str]]]:
    """Case id -> (config split, person) for the training cases (``imagesTr``) of a ``conversion.json``."""
    out = {}
    for cid, rec in sorted(conversion.get("Cases", {}).items()):
        if rec.get("split") == "Tr":
            out[cid] = (rec["config_split"], person_of(rec["image"]))
    return out


def _deal(people: list[tuple[str, str]], n_cases: dict, n_groups: int, rng: random.Random) -> list[set]:
    """People dealt to ``n_groups`` groups, dataset by dataset (sorted), shuffled within each dataset."""
    groups: list[set] = [set() for _ in range(n_groups)]
    size = [0] * n_groups
    by_dataset = defaultdict(list)
    for p in sorted(people):
        by_dataset[p[0]].append(p)
    for dataset in sorted(by_dataset):
        members = by_dataset[dataset]
        rng.shuffle(members)
        here = [0] * n_groups
        for p in members:
            g = min(range(n_groups), key=lambda i: (here[i], size[i], len(groups[i]), i))
            groups[g].add(p)
            here[g] += 1
            size[g] += n_cases[p]
    return groups


def make_splits(cases: dict[str, tuple[str, tuple[str, str]]], seed: int = 0,
                only_fold0: bool = False) -> list[dict]:
    """nnU-Net's folds for training cases ``{case: (config split, person)}`` (see the module docstring).

    >>> cases = {f"c{i}": ("VALIDATION" if i < 2 else "TRAINING", ("d", f"sub-{i // 2}")) for i in range(12)}
    >>> s = make_splits(cases, seed=0)
    >>> len(s), s[0]["val"]
    (5, ['c0', 'c1'])
    >>> sorted(c for f in s for c in f["val"]) == sorted(cases)   # every case validated once
    True
    >>> make_splits({"c0": ("TRAINING", ("d", "sub-0"))})
    Traceback (most recent call last):
    ...
    sacrum_masks.splits.SplitError: TRAINING+VALIDATION: 1 person (a dataset and subject), 5 grouped folds need 5: FOLD=all or fold 0 (with a VALIDATION list) still work
    """
    people_cases = defaultdict(list)
    for cid, (_key, person) in cases.items():
        people_cases[person].append(cid)
    people = sorted(people_cases)
    val0 = sorted(cid for cid, (key, _p) in cases.items() if key == "VALIDATION")
    if val0 and only_fold0:
        return [{"train": sorted(c for c in cases if c not in set(val0)), "val": val0}]
    if len(people) < N_FOLDS:
        n = len(people)
        raise SplitError("TRAINING+VALIDATION", f"{n} {'person' if n == 1 else 'people'} (a dataset and subject), "
                         f"{N_FOLDS} grouped folds need {N_FOLDS}: FOLD=all or fold 0 (with a VALIDATION list) "
                         f"still work")
    rng = random.Random(seed)
    n_cases = {p: len(c) for p, c in people_cases.items()}
    if val0:
        in_val0 = {cases[c][1] for c in val0}
        groups = _deal([p for p in people if p not in in_val0], n_cases, N_FOLDS - 1, rng)
        val_sets = [set(val0)] + [{c for p in g for c in people_cases[p]} for g in groups]
    else:
        groups = _deal(people, n_cases, N_FOLDS, rng)
        val_sets = [{c for p in g for c in people_cases[p]} for g in groups]
    every = sorted(cases)
    return [{"train": [c for c in every if c not in v], "val": sorted(v)} for v in val_sets]


def leaks(splits: list[dict], cases: dict[str, tuple[str, tuple[str, str]]]) -> list[str]:
    """One text per fold that has a person on both sides (``"fold 0: goldatlas sub-01"``)."""
    out = []
    for i, fold in enumerate(splits):
        train = {cases[c][1] for c in fold["train"] if c in cases}
        both = sorted({cases[c][1] for c in fold["val"] if c in cases} & train)
        if both:
            out.append(f"fold {i}: " + ", ".join(f"{d} {s}" for d, s in both))
    return out


def splits_text(splits: list[dict]) -> str:
    """The JSON text written (nnU-Net's own layout: a list of {"train", "val"})."""
    return json.dumps(splits, indent=2) + "\n"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def ensure_splits(raw_dir: Path, pp_dir: Path, folds, force: bool = False, say=print) -> Path | None:
    """Write (or keep) ``pp_dir/splits_final.json`` for the raw dataset ``raw_dir``; returns its path.

    None when the raw dataset has no ``conversion.json`` (not made by ``convert``: nnU-Net's own split).

    ``folds`` are the folds about to be trained (:func:`sacrum_masks.folds.parse_folds` values): with
    fewer than 5 people, only 0 and ``all`` are possible. Raises :class:`SplitError` (nothing
    written) when no split fits. ``say`` gets the one-line reports.
    """
    path, stamp = pp_dir / SPLITS, pp_dir / STAMP
    record = raw_dir / "conversion.json"
    if not record.is_file():
        say(f"no {record} (a dataset not made by sacrum-masks convert): nnU-Net's own split is used")
        return None
    try:
        conversion = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise SplitError(record, "unreadable: rebuild the dataset (make dataset FORCE=1)") from None
    cases = training_cases(conversion)
    seed = int(conversion.get("Seed", 0))
    numbered = [f for f in folds if f != "all"]
    try:
        wanted = make_splits(cases, seed)
    except SplitError:
        has_val = any(key == "VALIDATION" for key, _ in cases.values())
        if any(f != 0 for f in numbered) or (numbered and not has_val):
            raise                                     # folds 1-4, or fold 0 without VALIDATION: impossible
        if not numbered:
            return None                               # FOLD=all alone: nnU-Net reads no split
        wanted = make_splits(cases, seed, only_fold0=True)
    for line in leaks(wanted[:1], cases):
        say(f"warning: the config puts one person in TRAINING and VALIDATION ({line}); fold 0 keeps the "
            f"config as it is")
    text = splits_text(wanted)
    if path.is_file():
        current = path.read_text(encoding="utf-8", errors="replace")
        try:
            same = json.loads(current) == wanted
        except ValueError:
            same = False
        if same:
            if not stamp.is_file():
                stamp.write_text(_sha(current) + "\n", encoding="utf-8")
            return path
        ours = stamp.is_file() and stamp.read_text(encoding="utf-8").strip() == _sha(current)
        if not ours and not force:
            say(f"kept {path}: it differs from the config's split (edited by hand?); FORCE=1 rewrites it")
            _check_cases(path, current, cases)
            return path
        say(f"{'replacing' if ours else 'FORCE=1: rewriting'} {path} with the config's split")
    pp_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(text, path)
    n_people = len({p for _, p in cases.values()})
    say(f"wrote {path}: fold 0 = the config ({len(wanted[0]['train'])} train, {len(wanted[0]['val'])} val cases)"
        + (f", folds 1-4 grouped by person ({n_people} people, seed {seed})" if len(wanted) > 1 else ""))
    stamp.write_text(_sha(text) + "\n", encoding="utf-8")
    return path


def _check_cases(path: Path, text: str, cases: dict) -> None:
    """A kept hand-made file must name only training cases of the dataset (nnU-Net would crash later)."""
    try:
        splits = json.loads(text)
        named = {c for fold in splits for side in ("train", "val") for c in fold[side]}
    except (ValueError, TypeError, KeyError):
        raise SplitError(path, "not a list of {\"train\": [...], \"val\": [...]}: fix it, or FORCE=1 rewrites it") \
            from None
    unknown = sorted(named - set(cases))
    if unknown:
        raise SplitError(path, f"names {len(unknown)} case(s) not in the dataset ({', '.join(unknown[:3])}"
                         f"{', ...' if len(unknown) > 3 else ''}): fix it, or FORCE=1 rewrites it")


def trained_split(fold_dir: Path) -> tuple[list[str], list[str]] | None:
    """The ``(train, val)`` case lists a finished nnU-Net fold really used, or None when not recorded.

    nnU-Net writes ``fold_<F>/debug.json`` with the dataset loader's state, and validates the whole
    ``val`` list into ``fold_<F>/validation/summary.json`` (``metric_per_case[*].reference_file``);
    the validation case list is read from the latter, which is what the fold's checkpoint_best was
    chosen on.
    """
    summary = fold_dir / "validation" / "summary.json"
    try:
        data = json.loads(summary.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    val = sorted(Path(m["reference_file"]).name.removesuffix(".nii.gz") for m in data.get("metric_per_case", []))
    return [], val


def check_trained_split(fold_dir: Path, fold: int, splits_path: Path) -> str | None:
    """None when fold ``fold``'s validation cases are those of ``splits_path``; else a one-line reason."""
    used = trained_split(fold_dir)
    if used is None:
        return f"{fold_dir}: no validation/summary.json: cannot check the split nnU-Net used"
    try:
        want = sorted(json.loads(splits_path.read_text(encoding="utf-8"))[fold]["val"])
    except (OSError, ValueError, IndexError, KeyError):
        return f"{splits_path}: no fold {fold}"
    if used[1] != want:
        return (f"{fold_dir}: nnU-Net validated {len(used[1])} cases, {splits_path.name} fold {fold} lists "
                f"{len(want)}; they differ (was it trained before splits_final.json was written? FORCE=1 retrains)")
    return None
