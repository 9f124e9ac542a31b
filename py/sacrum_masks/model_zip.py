"""Install a trained nnU-Net model from a zip file or a URL (``sacrum-masks install-model``).

The zip has nnU-Net's export layout (``nnUNetv2_export_model_to_zip``): members relative to
``nnUNet_results``, e.g. ``Dataset300_SacrumDataset/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/...``.
Every member name is checked before anything is extracted (no absolute path, no ``..``, no link);
the archive is extracted into a hidden folder beside the destination and each model folder is
renamed into place, so an interrupted install never leaves half a model where a run would use it.
Concurrent installs of one model (SLURM array tasks starting on a fresh node) take an exclusive lock
(``<nnUNet_results>/.install-<Dataset>.lock``): one installs, the others wait, find the folder and use it.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath

import click

from .errors import InputError

#: the original release of the sacrum model (totalspineseg, "sacrum-seg")
DEFAULT_MODEL_ZIP = ("https://github.com/neuropoly/totalspineseg/releases/download/sacrum-seg/"
                     "Dataset300_SacrumDataset.zip")


def is_url(source: str) -> bool:
    """True for ``http://``, ``https://`` and ``file://`` sources."""
    return source.split("://", 1)[0].lower() in ("http", "https", "file") and "://" in source


def check_member_name(name: str) -> PurePosixPath:
    """The member's relative path, or :class:`InputError` for a name that could escape the destination.

    >>> check_member_name("Dataset300_X/nnUNetTrainer__nnUNetPlans__3d_fullres/plans.json").parts[0]
    'Dataset300_X'
    >>> check_member_name("../evil.py")
    Traceback (most recent call last):
    ...
    sacrum_masks.errors.InputError: ../evil.py: zip member leaves the destination folder ('..')
    """
    unified = name.replace("\\", "/")
    path = PurePosixPath(unified)
    if unified.startswith("/") or (len(unified) > 1 and unified[1] == ":"):
        raise InputError(name, "zip member has an absolute path")
    if ".." in path.parts:
        raise InputError(name, "zip member leaves the destination folder ('..')")
    if not path.parts or name == "":
        raise InputError(name, "zip member has an empty name")
    return path


def check_zip(zf: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
    """Check every member of an open zip before extraction; returns the members.

    Raises
    ------
    InputError
        A member with an absolute path, a ``..`` component or a symbolic link.
    """
    members = zf.infolist()
    for info in members:
        check_member_name(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise InputError(info.filename, "zip member is a symbolic link")
    return members


def download(url: str, dest: Path, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (through a temporary file); a failure is one :class:`InputError` line."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            shutil.copyfileobj(resp, out, 1 << 20)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise InputError(f"cannot download {url}", f"{reason}; download it on a connected machine and "
                         f"pass --model-zip PATH") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return dest


def install_model_zip(zip_path: str | Path, results: str | Path, expect: str | None = None) -> list[Path]:
    """Install the model folders of an nnU-Net export zip under ``results`` (``nnUNet_results``).

    Parameters
    ----------
    zip_path : path-like
        The zip file (``nnUNetv2_export_model_to_zip`` layout).
    results : path-like
        The nnU-Net results folder the zip's members are relative to.
    expect : str, optional
        ``"<Dataset>/<Trainer__Plans__Configuration>"``: the model folder the caller needs; an
        :class:`InputError` when the zip does not hold it.

    Returns
    -------
    list of Path
        The model folders now present under ``results`` (installed now or already there, which are
        left untouched).
    """
    zip_path, results = Path(zip_path), Path(results)
    try:
        zf = zipfile.ZipFile(zip_path)
    except FileNotFoundError:
        raise InputError(zip_path, "no such file") from None
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(zip_path, f"not a zip file ({exc})") from None
    with zf:
        members = check_zip(zf)
        # model folders = the first two levels of every member under a Dataset folder
        folders = sorted({PurePosixPath(*check_member_name(m.filename).parts[:2])
                          for m in members if len(check_member_name(m.filename).parts) > 2})
        if not folders:
            raise InputError(zip_path, "holds no <Dataset>/<trainer folder>/ model (not an nnU-Net export zip)")
        if expect is not None and PurePosixPath(expect) not in folders:
            found = ", ".join(str(f) for f in folders)
            raise InputError(zip_path, f"does not hold the model {expect} (it holds {found})")
        results.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".install-model-", dir=results))
        try:
            zf.extractall(staging, members)
            installed = []
            for folder in folders:
                dest = results / folder
                if not dest.exists():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staging / folder, dest)
                installed.append(dest)
            return installed
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def install_model(source: str, model_dir: str | Path, timeout: float = 60.0) -> Path:
    """Make sure ``model_dir`` (``<results>/<Dataset>/<trainer folder>``) exists, installing it from ``source``.

    ``source`` is a zip path or an ``http(s)://`` / ``file://`` URL; a download goes to a temporary file
    beside the results folder and is deleted after the install.
    """
    ensure_model(source, model_dir, timeout)
    return Path(model_dir)


def ensure_model(source: str, model_dir: str | Path, timeout: float = 60.0) -> bool:
    """:func:`install_model`, returning True when this process installed it (False: it was there, or
    another process installed it while this one waited for the lock)."""
    from .batch import folder_lock

    model_dir = Path(model_dir)
    if model_dir.is_dir():
        return False
    results = model_dir.parent.parent
    with folder_lock(results, wait=True, name=f".install-{model_dir.parent.name}.lock"):
        if model_dir.is_dir():   # another process installed it while this one waited
            return False
        _install(source, model_dir, results, timeout)
    return True


def _install(source: str, model_dir: Path, results: Path, timeout: float) -> None:
    expect = f"{model_dir.parent.name}/{model_dir.name}"
    if is_url(source):
        results.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".model-download-", suffix=".zip", dir=results)
        os.close(fd)
        try:
            download(source, Path(tmp), timeout=timeout)
            install_model_zip(tmp, results, expect)
        finally:
            Path(tmp).unlink(missing_ok=True)
    else:
        install_model_zip(source, results, expect)


@click.command("install-model")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="Model folder that must exist: <nnUNet_results>/<Dataset>/<Trainer__Plans__Configuration>.")
@click.option("--model-zip", "source", default=DEFAULT_MODEL_ZIP, show_default=True,
              help="Zip file or URL to install it from when it is missing.")
@click.option("--timeout", default=60.0, show_default=True, help="Download timeout (seconds).")
def install_model_command(model_dir: Path, source: str, timeout: float):
    """Install a missing nnU-Net model folder from an export zip (path or URL); nothing to do when present."""
    if model_dir.is_dir():
        click.echo(f"install-model: model present  {model_dir}")
        return
    click.echo(f"install-model: installing {model_dir} from {source}")
    if ensure_model(source, model_dir, timeout=timeout):
        click.echo(f"install-model: installed  {model_dir}")
    else:
        click.echo(f"install-model: model present  {model_dir} (installed by another process meanwhile)")
