"""Split configs: make one from a list of files (``init-config``) and load one portably (:func:`load_config`).

The format is the original procedure's (totalspineseg ``init_data_config.py``)::

    {"TYPE": "LABEL" | "IMAGE", "CONTRASTS": "t1_t2", "DATASETS_PATH": "/abs/or/${VAR}/path",
     "SEED": 0, "TRAINING": [...], "VALIDATION": [...], "TESTING": [...]}

* Entries are paths relative to ``DATASETS_PATH``, whose first part is the dataset folder
  (``spider-challenge-2023/sub-053/anat/sub-053_acq-lowresSag_T2w.nii.gz``).
* For ``TYPE`` ``LABEL`` the entries are label files (``<ds>/derivatives/<name>/sub-*/[ses-*/]anat/
  <image stem>_seg.nii.gz``); the image of a label is the same path without ``derivatives/<name>/``
  and without the label suffix (:func:`image_from_label`). For ``IMAGE`` the entries are images.
* ``CONTRASTS`` is the code of the original ``CONTRAST`` table for the set of image contrasts.
* ``SEED`` is ours (the original split was not seeded); the original scripts ignore it.

``DATASETS_PATH`` may be absolute (original configs) or hold ``${VAR}`` expanded from the
environment (``"${SACRUM_DATA}/bids"`` in ``resources/configs``); ``$$`` stands for a literal ``$``
(init-config writes a folder name's ``$`` so). It is overridden, in this order,
by the ``datasets_path`` argument (``--datasets-path``) and by the environment variable
``DATASETS_PATH``. An entry that leaves ``DATASETS_PATH`` (absolute, ``..``, or a symbolic link
pointing outside) is refused.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from pathlib import Path, PurePosixPath

import click

from .bids import BidsName
from .errors import InputError
from .nifti import write_json_atomic

#: The original procedure's contrast codes (totalspineseg / disc-labeling-hourglass ``CONTRAST``).
CONTRASTS: dict[str, tuple[str, ...]] = {
    "t1": ("T1w",),
    "t2": ("T2w",),
    "t2s": ("T2star",),
    "t1_t2": ("T1w", "T2w"),
    "psir": ("PSIR",),
    "stir": ("STIR",),
    "psir_stir": ("PSIR", "STIR"),
    "t1_t2_psir_stir": ("T1w", "T2w", "PSIR", "STIR"),
}
_CONTRAST_LOOKUP = {tuple(sorted(v)): k for k, v in CONTRASTS.items()}

#: Label suffixes accepted after the image stem, longest first.
LABEL_SUFFIXES: tuple[tuple[str, ...], ...] = (("label-sacrum", "seg"), ("seg",))

SPLIT_KEYS = ("TRAINING", "VALIDATION", "TESTING")
TYPES = ("LABEL", "IMAGE")

#: ``$$`` (a literal ``$``), ``${VAR}`` or ``$VAR``
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


# --------------------------------------------------------------------------------------------- names


def contrasts_code(contrasts) -> str:
    """The ``CONTRASTS`` code of a set of image contrasts.

    >>> contrasts_code({"T2w", "T1w"})
    't1_t2'
    >>> contrasts_code(["T1w"])
    't1'
    """
    key = tuple(sorted(set(contrasts)))
    try:
        return _CONTRAST_LOOKUP[key]
    except KeyError:
        table = ", ".join(f"{k} = {'+'.join(v)}" for k, v in CONTRASTS.items())
        raise InputError("contrasts", f"{'+'.join(key) or 'none'} is not a set of the CONTRASTS table ({table})") from None


def label_suffix(bn: BidsName) -> tuple[str, ...] | None:
    """The :data:`LABEL_SUFFIXES` entry that ends ``bn`` (after at least one other part), else None.

    >>> label_suffix(BidsName.parse("sub-01_T2w_label-sacrum_seg.nii.gz"))
    ('label-sacrum', 'seg')
    >>> label_suffix(BidsName.parse("sub-01_T2w.nii.gz")) is None
    True
    """
    for suffix in LABEL_SUFFIXES:
        if bn.parts[-len(suffix):] == suffix and len(bn.parts) > len(suffix):
            return suffix
    return None


def image_from_label(label: str | Path) -> Path:
    """The image of a label file: drop ``derivatives/<name>/`` and the label suffix.

    Accepted suffixes: ``_label-sacrum_seg`` and ``_seg`` (see :data:`LABEL_SUFFIXES`).

    >>> str(image_from_label("/d/ds/derivatives/reg-labels/sub-01/anat/sub-01_T1w_seg.nii.gz"))
    '/d/ds/sub-01/anat/sub-01_T1w.nii.gz'
    >>> str(image_from_label("ds/derivatives/labels/sub-2/ses-1/anat/sub-2_ses-1_T2w_label-sacrum_seg.nii.gz"))
    'ds/sub-2/ses-1/anat/sub-2_ses-1_T2w.nii.gz'
    """
    label = Path(label)
    bn = BidsName.parse(label)
    suffix = label_suffix(bn)
    if suffix is None:
        raise InputError(label, "not a label file name (expected <image stem>_seg or _label-sacrum_seg)")
    image_name = bn.drop_suffix(*suffix).name
    parts = label.parent.parts
    idx = [i for i, p in enumerate(parts) if p == "derivatives"]
    if not idx or idx[-1] + 2 > len(parts):
        raise InputError(label, "not in a derivatives/<name>/ folder of a BIDS dataset")
    i = idx[-1]
    return Path(*parts[:i], *parts[i + 2:], image_name)


def dataset_dir(image: str | Path) -> Path:
    """The BIDS dataset folder of an image: the parent of its ``sub-<label>`` folder.

    >>> str(dataset_dir("/d/ds/sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz"))
    '/d/ds'
    """
    image = Path(image)
    sub = "sub-" + BidsName.parse(image).sub
    for folder in image.parents:
        if folder.name == sub:
            return folder.parent
    raise InputError(image, f"not inside a {sub}/ folder of a BIDS dataset")


def subject_key(rel_path: str) -> tuple[str, str]:
    """Grouping key of a config entry: (dataset folder, subject label).

    >>> subject_key("ds/derivatives/reg-labels/sub-01/anat/sub-01_T2w_seg.nii.gz")
    ('ds', '01')
    """
    parts = PurePosixPath(rel_path).parts
    if len(parts) < 2:
        raise InputError(rel_path, "entry must be <dataset>/.../<file> relative to DATASETS_PATH")
    return parts[0], BidsName.parse(parts[-1]).sub


# --------------------------------------------------------------------------------------------- split


def check_fractions(validation: float, test: float) -> None:
    """Each fraction in [0, 1], and their sum at most 1."""
    for opt, value in (("--split-validation", validation), ("--split-test", test)):
        if not 0.0 <= value <= 1.0:
            raise InputError(opt, f"{value} is not in [0, 1]")
    if validation + test > 1.0 + 1e-12:
        raise InputError("--split-validation/--split-test", f"sum {validation + test:g} is over 1")


def split_entries(entries, validation: float = 0.1, test: float = 0.1, seed: int = 0) -> dict[str, list[str]]:
    """Seeded split of config entries into TRAINING / VALIDATION / TESTING, grouped by subject.

    Every file of a subject (dataset folder + ``sub`` label: all its contrasts and sessions) lands
    in one split. Subjects are shuffled within each dataset (``random.Random(seed)``, inputs sorted
    first), then interleaved by their relative rank so that every split takes about the same share
    of each dataset. ``round(n * test)`` subjects go to TESTING, ``round(n * validation)`` to
    VALIDATION (fewer if both would not fit), the rest to TRAINING. Each list is sorted.

    Parameters
    ----------
    entries : iterable of str
        Paths relative to DATASETS_PATH (``<dataset>/.../<bids name>``); no duplicates.
    validation, test : float
        Fractions of subjects, each in [0, 1], sum <= 1.
    seed : int
        Seed of the shuffle; the same inputs and seed give the same split.

    Examples
    --------
    >>> s = split_entries(["a/sub-1/anat/sub-1_T1w.nii.gz", "a/sub-1/anat/sub-1_T2w.nii.gz",
    ...                    "a/sub-2/anat/sub-2_T1w.nii.gz"], validation=0, test=0.5, seed=0)
    >>> sorted(len(v) for v in s.values())
    [0, 1, 2]
    """
    check_fractions(validation, test)
    entries = [str(e) for e in entries]
    dupes = sorted(e for e, n in Counter(entries).items() if n > 1)
    if dupes:
        raise InputError(dupes[0], f"listed more than once ({len(dupes)} duplicate entries)")
    groups: dict[tuple[str, str], list[str]] = {}
    for e in sorted(entries):
        groups.setdefault(subject_key(e), []).append(e)
    by_dataset: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(groups):
        by_dataset.setdefault(key[0], []).append(key)
    rng = random.Random(seed)
    ranked = []
    for ds in sorted(by_dataset):
        keys = list(by_dataset[ds])
        rng.shuffle(keys)
        for k, key in enumerate(keys):
            ranked.append(((k + 0.5) / len(keys), rng.random(), key))
    ranked.sort()
    order = [key for _, _, key in ranked]
    n = len(order)
    n_test = min(n, int(n * test + 0.5))
    n_val = min(n - n_test, int(n * validation + 0.5))
    assigned = {"TESTING": order[:n_test], "VALIDATION": order[n_test:n_test + n_val],
                "TRAINING": order[n_test + n_val:]}
    return {k: sorted(e for key in assigned[k] for e in groups[key]) for k in SPLIT_KEYS}


# --------------------------------------------------------------------------------------------- init


def _read_list(txt: Path) -> list[Path]:
    try:
        lines = txt.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(txt, f"cannot read ({exc.strerror})") from None
    paths = [Path(os.path.abspath(os.path.expanduser(line))) for line in lines if line.strip()]
    if not paths:
        raise InputError(txt, "lists no files")
    return paths


def make_config(files, type_: str, validation: float = 0.1, test: float = 0.1, seed: int = 0,
                portable: str | None = None, source: str | Path = "list") -> dict:
    """Build a split config from absolute label (``LABEL``) or image (``IMAGE``) paths.

    Checks that every file (and, for labels, its image) exists, that all datasets share one parent
    folder (``DATASETS_PATH``) and that the image contrasts form a ``CONTRASTS`` code.

    Parameters
    ----------
    files : list of path-like
        Absolute paths (as ``find ~+ ...`` prints them).
    type_ : {"LABEL", "IMAGE"}
    validation, test, seed
        See :func:`split_entries`.
    portable : str, optional
        Name of an environment variable (``SACRUM_DATA``): DATASETS_PATH is written as
        ``${VAR}/<rest>`` instead of an absolute path; the parent folder must be inside ``$VAR``.
    source : path-like
        Named in error messages (the list file).
    """
    if type_ not in TYPES:
        raise InputError("--type", f"{type_!r} is not LABEL or IMAGE")
    check_fractions(validation, test)
    files = [Path(f) for f in files]
    images = [image_from_label(f) for f in files] if type_ == "LABEL" else list(files)
    missing = [str(p) for p in dict.fromkeys((files + images) if type_ == "LABEL" else files) if not p.is_file()]
    if missing:
        raise InputError(source, f"{len(missing)} missing file(s): " + ", ".join(missing))
    parents = sorted({str(dataset_dir(img).parent) for img in images})
    if len(parents) != 1:
        raise InputError(source, "all BIDS datasets must be in one parent folder (DATASETS_PATH); found "
                         + ", ".join(parents))
    root = Path(parents[0])
    code = contrasts_code(BidsName.parse(img).contrast for img in images)
    entries = [f.relative_to(root).as_posix() for f in files]
    config = {"TYPE": type_, "CONTRASTS": code, "DATASETS_PATH": _portable_path(root, portable), "SEED": seed}
    config.update(split_entries(entries, validation, test, seed))
    return config


def _portable_path(root: Path, var: str | None) -> str:
    """DATASETS_PATH as written in a config: a literal ``$`` of a folder name doubled (see :func:`expand_vars`)."""
    if not var:
        return str(root).replace("$", "$$")
    base = os.environ.get(var)
    if not base:
        raise InputError("--portable", f"environment variable {var} is not set")
    base_path = Path(os.path.abspath(os.path.expanduser(base)))
    try:
        rest = root.relative_to(base_path)
    except ValueError:
        try:
            rest = root.resolve().relative_to(base_path.resolve())
        except ValueError:
            raise InputError("--portable", f"DATASETS_PATH {root} is not inside ${var} ({base_path})") from None
    return "${" + var + "}" + ("" if str(rest) == "." else "/" + rest.as_posix().replace("$", "$$"))


@click.command("init-config")
@click.option("--txt", "txt", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text file with one path per line (find ~+ -type f -name '*_seg.nii.gz' | grep -v CT | sort).")
@click.option("--type", "type_", default=None, type=click.Choice(TYPES),
              help="What the listed files are (required with --txt; LABEL with --review).")
@click.option("--split-validation", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of subjects for VALIDATION.")
@click.option("--split-test", default=0.1, show_default=True, type=click.FloatRange(0, 1),
              help="Fraction of subjects for TESTING.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the split (stored as SEED).")
@click.option("--portable", metavar="VAR", default=None,
              help="Write DATASETS_PATH as ${VAR}/... (e.g. SACRUM_DATA) instead of an absolute path.")
@click.option("--review", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="review.tsv from the QC page: the masks marked pass plus the manual corrections beside them "
                   "(instead of --txt).")
@click.option("--datasets-path", type=click.Path(exists=True, file_okay=False, path_type=Path),
              envvar="DATASETS_PATH", default=None,
              help="With --review: the folder holding the datasets its mask paths start from.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output JSON [default: the list file with .json instead of .txt].")
def init_config_command(txt, type_, split_validation, split_test, seed, portable, review, datasets_path, output):
    """Make a split config (original totalspineseg format) from a list of label or image files,
    or (--review) from a QC review: the masks marked pass plus the manual corrections found beside them.

    Splits are seeded and grouped by subject (dataset + sub label): a subject's T1w and T2w
    never land in two splits. Paths are stored relative to DATASETS_PATH. A config made from a review
    records the review file and its SHA-256 (REVIEW).
    """
    if (txt is None) == (review is None):
        raise click.UsageError("give --txt or --review (one of them)")
    source = txt or review
    output = output if output is not None else source.with_suffix(".json")
    if output.resolve() == source.resolve():
        raise InputError(output, "output would overwrite the input list")
    if review is not None:
        config = _config_from_review(review, datasets_path, type_, split_validation, split_test, seed, portable)
    else:
        if type_ is None:
            raise click.UsageError("--type is required with --txt")
        config = make_config(_read_list(txt), type_, split_validation, split_test, seed, portable, source=txt)
    write_json_atomic(config, output)
    counts = ", ".join(f"{len(config[k])} {k.lower()}" for k in SPLIT_KEYS)
    click.echo(f"init-config: wrote {output} ({config['CONTRASTS']}; {counts})")


def _config_from_review(review: Path, datasets_path, type_, validation, test, seed, portable) -> dict:
    """The next round's config from a review.tsv (see :mod:`sacrum_masks.qc_review`)."""
    from .nifti import sha256_file
    from .qc_review import reviewed_labels

    if type_ not in (None, "LABEL"):
        raise click.UsageError("--review makes a LABEL config")
    if datasets_path is None:
        raise InputError("--datasets-path", "needed with --review: the folder holding the datasets that the "
                                            "review's mask paths start from (or set DATASETS_PATH)")
    root = Path(os.path.abspath(datasets_path))
    labels, counts = reviewed_labels(review, root, warn=lambda line: click.echo(line, err=True))
    if not labels:
        raise InputError(review, "no mask marked pass and no manual correction found: nothing to train on")
    config = make_config(labels, "LABEL", validation, test, seed, portable, source=review)
    config["REVIEW"] = {"FILE": str(review.resolve()), "SHA256": sha256_file(review), **counts}
    click.echo(f"init-config: review {review.name}: {counts['passed']} passed, {counts['corrected']} corrected, "
               f"{counts['left_out']} left out (fail/artifact), {counts['missing']} missing")
    return config


# --------------------------------------------------------------------------------------------- load


def expand_vars(value: str, source, what: str = "DATASETS_PATH", env=None) -> str:
    """Expand ``${VAR}`` / ``$VAR`` from the environment; an unset variable is an error; ``$$`` is ``$``.

    >>> expand_vars("${HOME_X}/bids", "c.json", env={"HOME_X": "/data"})
    '/data/bids'
    >>> expand_vars("/data/a$$b", "c.json", env={})
    '/data/a$b'
    """
    env = os.environ if env is None else env

    def sub(match):
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(2)
        if not env.get(name):
            raise InputError(source, f"{what} uses ${{{name}}}, which is not set: set it, set DATASETS_PATH "
                             "or pass --datasets-path")
        return env[name]

    return _VAR.sub(sub, value)


def resolve_datasets_path(config: dict, source, datasets_path=None, env=None) -> Path:
    """DATASETS_PATH after overrides (argument > env ``DATASETS_PATH`` > config), absolute, symlinks resolved."""
    env = os.environ if env is None else env
    if datasets_path not in (None, ""):
        value, origin = str(datasets_path), "--datasets-path"
    elif env.get("DATASETS_PATH"):
        value, origin = env["DATASETS_PATH"], "DATASETS_PATH (environment)"
    else:
        value, origin = config.get("DATASETS_PATH") or "", source
        if not isinstance(value, str):
            raise InputError(source, "DATASETS_PATH is not a string")
        if not value.strip():
            raise InputError(source, "DATASETS_PATH is blank: pass --datasets-path DIR or set DATASETS_PATH "
                             "to the folder holding the BIDS datasets")
    value = expand_vars(value, origin, env=env)
    return Path(os.path.abspath(os.path.expanduser(value))).resolve()


def entry_path(root: Path, entry, key: str = "entry") -> Path:
    """Absolute path of a config entry under ``root`` (resolved); refuse anything that leaves ``root``.

    ``root`` must already be resolved. Refused: non-strings, empty, absolute paths, ``~``,
    ``..`` parts, and paths whose symbolic links lead outside ``root``.

    >>> str(entry_path(Path("/d"), "ds/sub-01/anat/sub-01_T1w.nii.gz"))
    '/d/ds/sub-01/anat/sub-01_T1w.nii.gz'
    >>> entry_path(Path("/d"), "../x/sub-01_T1w.nii.gz", "TESTING[0]")
    Traceback (most recent call last):
    ...
    sacrum_masks.errors.InputError: TESTING[0] '../x/sub-01_T1w.nii.gz': '..' leaves DATASETS_PATH
    """
    if not isinstance(entry, str) or not entry.strip():
        raise InputError(f"{key} {entry!r}", "not a path")
    label = f"{key} {entry!r}"
    pure = PurePosixPath(entry)
    if pure.is_absolute() or entry.startswith("~") or "\\" in entry:
        raise InputError(label, "absolute path (entries are relative to DATASETS_PATH)")
    if ".." in pure.parts:
        raise InputError(label, "'..' leaves DATASETS_PATH")
    full = root.joinpath(*pure.parts)
    try:
        real = full.resolve()
    except RuntimeError:  # Python < 3.13 raises it for a symbolic link loop
        raise InputError(label, "symbolic link loop") from None
    if not real.is_relative_to(root):
        raise InputError(label, f"a symbolic link leads outside DATASETS_PATH (to {real})")
    return full


def read_json_object(path: str | Path) -> dict:
    """A JSON file holding an object; unreadable, invalid or non-object files raise :class:`InputError`."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(path, f"cannot read ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(path, f"not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise InputError(path, "not a JSON object")
    return raw


def read_json_object_or_none(path: str | Path) -> dict | None:
    """The JSON object in ``path``, or None when the file is missing, unreadable, not JSON or not an object.

    For files a stage wrote itself (sidecars, records): anything but an object means "redo", never a crash.
    """
    try:
        return read_json_object(path)
    except InputError:
        return None


def load_config(path: str | Path, datasets_path: str | Path | None = None, *, check_exists: bool = True,
                env=None) -> dict:
    """Load a split config with DATASETS_PATH resolved and every entry checked.

    Parameters
    ----------
    path : path-like
        The JSON config (original format, or ours with SEED).
    datasets_path : path-like, optional
        Overrides DATASETS_PATH (``--datasets-path``); else env ``DATASETS_PATH``; else the value in
        the config (``${VAR}`` expanded from the environment).
    check_exists : bool
        Also require DATASETS_PATH to be a folder and every entry to be a file (all missing ones
        named in one error). Stage 4 passes False and reports missing images one by one.
    env : mapping, optional
        Environment to read (default ``os.environ``).

    Returns
    -------
    dict
        A new dict: the config's keys, ``DATASETS_PATH`` an absolute resolved :class:`~pathlib.Path`,
        ``TRAINING``/``VALIDATION``/``TESTING`` lists of absolute Paths (missing lists are empty),
        ``SEED`` when present, and ``CONFIG_PATH`` (the config file).

    Raises
    ------
    InputError
        Unreadable JSON, bad TYPE/CONTRASTS, blank DATASETS_PATH with no override, an unset
        ``${VAR}``, an entry leaving DATASETS_PATH, or (check_exists) missing files; the message
        names the config file and the entries.
    """
    path = Path(path)
    raw = read_json_object(path)
    if raw.get("TYPE") not in TYPES:
        raise InputError(path, f"TYPE is {raw.get('TYPE')!r}, expected LABEL or IMAGE")
    if "CONTRASTS" in raw and raw["CONTRASTS"] not in CONTRASTS:
        raise InputError(path, f"CONTRASTS {raw['CONTRASTS']!r} is not one of {', '.join(CONTRASTS)}")
    root = resolve_datasets_path(raw, path, datasets_path, env)
    if check_exists and not root.is_dir():
        raise InputError(path, f"DATASETS_PATH {root} is not a folder (pass --datasets-path or set DATASETS_PATH)")
    config = {k: v for k, v in raw.items() if k not in SPLIT_KEYS}
    config["DATASETS_PATH"] = root
    config["CONFIG_PATH"] = path.resolve()
    problems, missing = [], []
    for key in SPLIT_KEYS:
        entries = raw.get(key, [])
        if not isinstance(entries, list):
            raise InputError(path, f"{key} is not a list")
        out = []
        for i, entry in enumerate(entries):
            try:
                full = entry_path(root, entry, f"{key}[{i}]")
            except InputError as exc:
                problems.append(str(exc))
                continue
            if check_exists and not full.is_file():
                missing.append(f"{key}[{i}] {entry}")
            out.append(full)
        config[key] = out
    if problems:
        raise InputError(path, f"{len(problems)} bad entr{'y' if len(problems) == 1 else 'ies'}: "
                         + "; ".join(problems))
    if missing:
        raise InputError(path, f"{len(missing)} missing file(s) under {root}: " + "; ".join(missing))
    return config


def relative_entry(config: dict, full: Path) -> str:
    """An entry of a loaded config back as its path relative to DATASETS_PATH (posix)."""
    return Path(full).relative_to(config["DATASETS_PATH"]).as_posix()


__all__ = ["CONTRASTS", "LABEL_SUFFIXES", "label_suffix", "check_fractions", "contrasts_code", "dataset_dir", "entry_path",
           "expand_vars", "image_from_label", "init_config_command", "load_config", "make_config",
           "relative_entry", "resolve_datasets_path", "split_entries", "subject_key"]
