"""``sacrum-masks train`` (stage 3, ``make train`` / bin/train.sh): plan, preprocess, train, evaluate, export.

For the dataset ``$nnUNet_raw/Dataset<DNUM>_<name>`` (built by bin/dataset.sh from ``--config`` when
absent) and the model folder ``M = $nnUNet_results/Dataset<DNUM>_<name>/<TRAINER>__nnUNetPlans__<CONFIGURATION>``:

1. the device is checked first (``sacrum-masks check-device``, in a child process so that no CUDA
   context stays in this one), before anything is written;
2. ``nnUNetv2_plan_and_preprocess`` runs unless the stamp ``.sacrum-raw-fingerprint-<config>`` in the
   preprocessed folder holds the raw dataset's :func:`raw_fingerprint` (a changed raw dataset also
   drops its old ``splits_final.json``); ``3d_fullres_small`` is planned as ``3d_fullres`` and added by
   ``sacrum-masks add-plans``;
3. each fold is trained (:func:`fold_state`: kept when finished, resumed with ``--c`` from
   ``checkpoint_latest.pth``, or trained from scratch), ``imagesTs`` is predicted into a temporary folder
   renamed when complete and evaluated against ``labelsTs`` (``M/evaluation_fold<F>.csv`` and ``.txt``);
4. all finished folds are exported to ``$nnUNet_results/<dataset>__<TRAINER>__nnUNetPlans__<CONFIGURATION>.zip``.

Every nnU-Net command runs in its own process group (its data-augmentation workers included); on
SIGINT or SIGTERM the group is terminated (SIGTERM, then SIGKILL 2 s later) and the command exits
128 + signal number (130, 143). One training per dataset number at a time: ``flock`` on
``$nnUNet_results/.Dataset<DNUM>.train.lock``, inherited by the nnU-Net commands, so that orphaned
workers of a killed run still hold it.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import click

from .errors import EXIT_BUSY


#: folds of ``FOLD=all``
ALL_FOLDS = (0, 1, 2, 3, 4)
#: configurations that reuse the preprocessed data (and plans) of another one
PREPROCESSED_AS = {"3d_fullres_small": "3d_fullres"}
#: bin/dataset.sh (stage 2), next to this package in the checkout
DATASET_SH = Path(__file__).resolve().parents[2] / "bin" / "dataset.sh"


class TrainStop(Exception):
    """A reason to stop, printed as one line ``train: <message>``, with the exit status ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------- pure decisions

def dataset_prefix(dnum: str) -> str:
    """``Dataset<NNN>`` for a dataset number given as text (1 to 3 digits).

    >>> dataset_prefix("7"), dataset_prefix("300")
    ('Dataset007', 'Dataset300')
    >>> dataset_prefix("1000")
    Traceback (most recent call last):
    ...
    ValueError: DNUM=1000: expected a dataset number from 1 to 999
    """
    if not re.fullmatch(r"[0-9]{1,3}", dnum):
        raise ValueError(f"DNUM={dnum}: expected a dataset number from 1 to 999")
    return f"Dataset{int(dnum):03d}"


def folds(fold: str) -> tuple[int, ...]:
    """The folds to train for ``FOLD``: ``all`` is folds 0 to 4 in order, a single digit is that fold.

    >>> folds("all"), folds("2")
    ((0, 1, 2, 3, 4), (2,))
    >>> folds("7")
    Traceback (most recent call last):
    ...
    ValueError: FOLD=7: expected a fold number (0 to 4) or all
    >>> folds("0,1")
    Traceback (most recent call last):
    ...
    ValueError: FOLD=0,1: expected a fold number (0 to 4) or all
    """
    if fold == "all":
        return ALL_FOLDS
    if len(fold) == 1 and fold in "01234":
        return (int(fold),)
    raise ValueError(f"FOLD={fold}: expected a fold number (0 to 4) or all")


def raw_fingerprint(raw_dir: str | Path) -> str:
    """SHA-256 (hex) of the relative names, sizes and modification times of a raw dataset's files.

    Regular files only (symbolic links are neither followed nor counted), files whose name starts with
    ``.`` left out; one line ``<relative path> <size> <mtime>\\n`` per file, ``mtime`` in seconds with ten
    decimals, lines sorted bytewise. This is exactly the digest of
    ``cd RAW && find . -type f ! -name '.*' -printf '%P %s %T@\\n' | LC_ALL=C sort | sha256sum``,
    so stamps written by the former bash implementation stay valid.

    An empty folder gives the digest of nothing,
    ``e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855``.
    """
    root = Path(raw_dir)
    lines = []
    for folder, _dirs, files in os.walk(root):   # hidden folders are walked; linked folders are not
        for name in files:
            path = Path(folder, name)
            st = path.lstat()
            if name.startswith(".") or not stat.S_ISREG(st.st_mode):
                continue
            sec, nsec = divmod(st.st_mtime_ns, 10**9)
            rel = os.fsencode(path.relative_to(root))
            lines.append(rel + f" {st.st_size} {sec}.{nsec:09d}0\n".encode())
    return hashlib.sha256(b"".join(sorted(lines))).hexdigest()


def find_dataset(folder: str | Path, prefix: str) -> str | None:
    """Name of the one folder ``<prefix>_*`` directly in ``folder``, or None (also when ``folder`` is absent).

    Raises
    ------
    TrainStop
        Several folders carry the number (nnU-Net would refuse to run).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted((e.name for e in os.scandir(folder)
                    if e.is_dir(follow_symlinks=False) and fnmatch.fnmatchcase(e.name, f"{prefix}_*")),
                   key=os.fsencode)
    if len(found) > 1:
        raise TrainStop(f"{folder} has several datasets numbered {prefix} ({' '.join(found)}); "
                        f"nnU-Net refuses to run: remove or renumber all but one")
    return found[0] if found else None


def _stamp_holds(stamp: Path, fingerprint: str) -> bool:
    """True when ``stamp`` is a file whose text (trailing newlines removed) is ``fingerprint``."""
    return stamp.is_file() and stamp.read_text(encoding="utf-8").rstrip("\n") == fingerprint


def plans_up_to_date(pp_dir: Path, pp_config: str, fingerprint: str, force: bool) -> bool:
    """True when planning and preprocessing of ``pp_config`` can be skipped.

    That is: no ``force``, the stamp ``pp_dir/.sacrum-raw-fingerprint-<pp_config>`` holds ``fingerprint``
    and ``pp_dir/nnUNetPlans.json`` exists.
    """
    stamp = pp_dir / f".sacrum-raw-fingerprint-{pp_config}"
    return not force and _stamp_holds(stamp, fingerprint) and (pp_dir / "nnUNetPlans.json").is_file()


def fold_state(fold_dir: str | Path, fingerprint: str, force: bool = False) -> str:
    """What to do with one fold's folder: ``"done"``, ``"resume"`` or ``"new"``.

    The fold's stamp ``.sacrum-raw-fingerprint`` records the raw dataset it was trained on.

    - ``"done"``: ``checkpoint_final.pth`` exists, no ``force``, and the stamp holds ``fingerprint`` or is
      absent (a fold trained before stamps existed is kept);
    - ``"resume"``: not done, the stamp holds ``fingerprint`` (no ``force``) and ``checkpoint_latest.pth``
      exists: nnUNetv2_train ``--c``;
    - ``"new"``: anything else (train from scratch).
    """
    fold_dir = Path(fold_dir)
    stamp = fold_dir / ".sacrum-raw-fingerprint"
    same = not force and _stamp_holds(stamp, fingerprint)
    if not force and (fold_dir / "checkpoint_final.pth").is_file() and (same or not stamp.is_file()):
        return "done"
    if same and (fold_dir / "checkpoint_latest.pth").is_file():
        return "resume"
    return "new"


def newer(a: str | Path, b: str | Path) -> bool:
    """bash's ``[[ a -nt b ]]``: ``a`` exists and ``b`` does not, or ``a`` was modified later (ns)."""
    try:
        ta = os.stat(a).st_mtime_ns
    except OSError:
        return False
    try:
        return ta > os.stat(b).st_mtime_ns
    except OSError:
        return True


def evaluation_up_to_date(table: Path, checkpoint: Path, predictions: Path) -> bool:
    """True when the evaluation table is newer than the checkpoint and the predictions folder exists."""
    return table.is_file() and newer(table, checkpoint) and predictions.is_dir()


def finished_folds(model: Path) -> list[int]:
    """Folds 0 to 4 of a model folder that have ``checkpoint_final.pth``."""
    return [f for f in ALL_FOLDS if (model / f"fold_{f}" / "checkpoint_final.pth").is_file()]


def zip_up_to_date(model: Path, zip_path: Path) -> bool:
    """True when ``zip_path`` exists and no finished fold's checkpoint is newer than it."""
    return zip_path.is_file() and not any(
        newer(model / f"fold_{f}" / "checkpoint_final.pth", zip_path) for f in finished_folds(model))


def _remove(path: Path) -> None:
    """``rm -rf path`` (nothing when absent)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ---------------------------------------------------------------- processes and signals

def _say(message: str) -> None:
    click.echo(f"train: {message}")


def _err(message: str) -> None:
    click.echo(f"train: {message}", err=True)


class ProcessGroups:
    """Runs commands one at a time, each in its own session (process group), and kills it on a signal.

    :meth:`install` makes SIGINT and SIGTERM terminate the running group (SIGTERM, then SIGKILL after
    ``grace`` seconds), print ``train: interrupted by SIG<NAME>; ...`` and exit 128 + signal number.
    """

    def __init__(self, pass_fds: tuple[int, ...] = (), grace: float = 2.0):
        self.pass_fds = pass_fds
        self.grace = grace
        self.child: subprocess.Popen | None = None

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)   # a second signal ends this process at once
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        child = self.child
        if child is not None:
            for sig, pause in ((signal.SIGTERM, self.grace), (signal.SIGKILL, 0)):
                try:
                    os.killpg(child.pid, sig)
                except ProcessLookupError:
                    pass
                time.sleep(pause)
            # no child.wait() here: the interrupted Popen.wait() holds its lock; init reaps the child
        _err(f"interrupted by {signal.Signals(signum).name}; run the same command again to resume")
        sys.exit(128 + signum)

    def run(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Run ``argv`` in a new session and wait; raise :class:`TrainStop` with its status when it fails.

        The status is the command's exit status, or 128 + signal number when a signal ended it.
        """
        self.child = subprocess.Popen(argv, env=env, start_new_session=True, pass_fds=self.pass_fds)
        try:
            rc = self.child.wait()
        finally:
            self.child = None
        if rc:
            raise TrainStop("", 128 - rc if rc < 0 else rc)


def _with_device(env: dict[str, str], device: str, gpu: str) -> dict[str, str]:
    """``env`` with ``CUDA_VISIBLE_DEVICES`` for GPU ``gpu`` for a CUDA run (a copy; unchanged for the CPU).

    An existing ``CUDA_VISIBLE_DEVICES`` (a SLURM allocation) is kept narrowed to ``gpu``, which then
    indexes it (:func:`sacrum_masks.device.visible_for`); the device check already refused a bad index.
    """
    if device != "cuda":
        return dict(env)
    from .device import visible_for

    return {**env, "CUDA_VISIBLE_DEVICES": visible_for(gpu, env.get("CUDA_VISIBLE_DEVICES"))}


def check_device_in_child(gpu: str) -> str:
    """``sacrum-masks check-device GPU`` in a child process; its nnU-Net ``-device`` value, or exit 1.

    A child process, so that neither a CUDA context nor ``CUDA_VISIBLE_DEVICES`` stays in this one.
    Its one-line reason goes to stderr as it is.
    """
    code = "from sacrum_masks.cli import main; main(prog_name='sacrum-masks')"
    res = subprocess.run([sys.executable, "-c", code, "check-device", gpu], stdout=subprocess.PIPE, text=True,
                         check=False)
    if res.returncode:
        raise TrainStop("", 1)
    return res.stdout.rstrip("\n")


def _invoke(command: click.Command, args: list[str]) -> None:
    """Run another sacrum-masks subcommand in this process; a non-zero exit status ends this one too."""
    try:
        command.main(args, prog_name=f"sacrum-masks {command.name}", standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise


def _nnunet_dir(var: str) -> Path:
    value = os.environ.get(var)
    if not value:
        raise TrainStop(f"{var} is not set: run bin/train.sh (or make train), which sets it from SACRUM_DATA", 2)
    return Path(value)


# ---------------------------------------------------------------- the stages

def train(dnum: str, gpu: str, fold: str, config: str | None, trainer: str, configuration: str,
          force: bool) -> None:
    """Stage 3 for dataset ``dnum`` (see the module docstring); raises :class:`TrainStop` to stop."""
    try:
        prefix = dataset_prefix(dnum)
        fold_list = folds(fold)
    except ValueError as exc:
        raise TrainStop(str(exc), 2) from None
    raw_root, pp_root, results = (_nnunet_dir(v) for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    groups = ProcessGroups()
    groups.install()
    device = check_device_in_child(gpu)
    if device == "cpu" and trainer == "nnUNetTrainer_SacrumCPU":
        _err(f"warning: training on the CPU (GPU=cpu): minutes with the small {trainer} on small images, "
             f"far longer on real ones")
    elif device == "cpu":
        _err(f"warning: training {trainer} on the CPU (GPU=cpu) is very slow (days for a full nnU-Net "
             f"training); give a GPU id")

    # 1. raw dataset (stage 2 when absent and a config is given)
    dname = find_dataset(raw_root, prefix)
    if dname is None:
        if not config:
            raise TrainStop(f"no {prefix}_* in {raw_root}: give CONFIG=<split.json> to build it (stage 2), "
                            f"or run make dataset first")
        _say(f"no {prefix}_* in {raw_root}: building it from {config} (stage 2)")
        stage2_env = {**os.environ, "DNUM": dnum, "CONFIG": config, "FORCE": "1" if force else "0"}
        groups.run(["bash", str(DATASET_SH)], env=stage2_env)
        dname = find_dataset(raw_root, prefix)
        if dname is None:
            raise TrainStop(f"stage 2 did not create {prefix}_* in {raw_root}")
    for other in (pp_root, results):
        there = find_dataset(other, prefix)
        if there is not None and there != dname:
            raise TrainStop(f"{other}/{there} has the number of {raw_root}/{dname}; nnU-Net refuses to run: "
                            f"remove or renumber one")
    pp_root.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    lock = results / f".{prefix}.train.lock"
    lock_fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise TrainStop(f"another training of {dname} is running (lock {lock})", EXIT_BUSY) from None
    groups.pass_fds = (lock_fd,)   # nnU-Net's processes hold the lock too (orphans of a killed run)

    # 2. plan and preprocess, unless the preprocessed data matches the raw dataset
    pp_config = PREPROCESSED_AS.get(configuration, configuration)
    pp_dir = pp_root / dname
    stamp = pp_dir / f".sacrum-raw-fingerprint-{pp_config}"
    fingerprint = raw_fingerprint(raw_root / dname)
    if plans_up_to_date(pp_dir, pp_config, fingerprint, force):
        _say(f"up to date: plan and preprocess {dname} {pp_config}")
    else:
        if stamp.is_file() and not _stamp_holds(stamp, fingerprint) and (pp_dir / "splits_final.json").is_file():
            _say(f"{raw_root / dname} changed: its old cross-validation splits (splits_final.json) are removed")
            (pp_dir / "splits_final.json").unlink()
        stamp.unlink(missing_ok=True)
        _say(f"plan and preprocess {dname} {pp_config}")
        # nnUNet_n_proc_DA=0 (augment in the main process) breaks planning: it is for training only
        plan_env = {k: v for k, v in os.environ.items() if k != "nnUNet_n_proc_DA"}
        groups.run(["nnUNetv2_plan_and_preprocess", "-d", dnum, "-c", pp_config, "--verify_dataset_integrity"],
                   env=plan_env)
        stamp.write_text(fingerprint + "\n", encoding="utf-8")
    if configuration == "3d_fullres_small":
        from .plans import add_plans_command

        _invoke(add_plans_command, [str(pp_dir / "nnUNetPlans.json"), "--name", configuration])

    # 3-5. train each fold, predict imagesTs and evaluate; then export
    model = results / dname / f"{trainer}__nnUNetPlans__{configuration}"
    env = _with_device(dict(os.environ), device, gpu)
    for f in fold_list:
        train_fold(groups, env, dnum, configuration, f, trainer, device, model, fingerprint, force)
        evaluate_fold(groups, env, raw_root / dname, dname, configuration, f, trainer, device, model)
    export_model(groups, dnum, dname, configuration, trainer, model, results)


def train_fold(groups: ProcessGroups, env: dict[str, str], dnum: str, configuration: str, fold: int,
               trainer: str, device: str, model: Path, fingerprint: str, force: bool) -> None:
    """Train (or resume, or keep) one fold; :class:`TrainStop` when no ``checkpoint_final.pth`` results."""
    fold_dir = model / f"fold_{fold}"
    state = fold_state(fold_dir, fingerprint, force)
    if state == "done":
        _say(f"up to date: fold {fold} of {model} (FORCE=1 retrains)")
        return
    args = ["nnUNetv2_train", dnum, configuration, str(fold), "-tr", trainer, "-device", device]
    if state == "resume":
        _say(f"resuming fold {fold} from {fold_dir / 'checkpoint_latest.pth'}")
        args.append("--c")
    else:
        _say(f"training fold {fold}: {trainer} {configuration} on {device}")
        fold_dir.mkdir(parents=True, exist_ok=True)
        for old in [*fold_dir.glob("checkpoint_*.pth"), model / f"evaluation_fold{fold}.csv"]:
            old.unlink(missing_ok=True)
        (fold_dir / ".sacrum-raw-fingerprint").write_text(fingerprint + "\n", encoding="utf-8")
    groups.run(args, env=env)
    final = fold_dir / "checkpoint_final.pth"
    if not final.is_file():
        raise TrainStop(f"nnUNetv2_train ended without {final}")


def evaluate_fold(groups: ProcessGroups, env: dict[str, str], raw: Path, dname: str, configuration: str,
                  fold: int, trainer: str, device: str, model: Path) -> None:
    """Predict ``raw/imagesTs`` with one fold (temporary folder, then renamed) and evaluate against labelsTs."""
    checkpoint = model / f"fold_{fold}" / "checkpoint_final.pth"
    preds = model / f"predictions_fold{fold}_imagesTs"
    table, summary = model / f"evaluation_fold{fold}.csv", model / f"evaluation_fold{fold}.txt"
    images = raw / "imagesTs"
    if not images.is_dir() or not any(os.scandir(images)):
        _say(f"no {images}: no test-split evaluation")
        return
    if evaluation_up_to_date(table, checkpoint, preds):
        try:
            line = summary.read_text(encoding="utf-8", errors="replace").rstrip("\n")
        except OSError:
            line = str(table)
        _say(f"up to date: {line}")
        return
    _say(f"predicting {images} with fold {fold}")
    tmp = preds.with_name(preds.name + ".tmp")
    _remove(tmp)
    _remove(preds)
    groups.run(["nnUNetv2_predict", "-i", str(images), "-o", str(tmp), "-d", dname, "-c", configuration,
                "-tr", trainer, "-f", str(fold), "-chk", "checkpoint_final.pth", "-device", device], env=env)
    if not tmp.is_dir():
        raise TrainStop(f"nnUNetv2_predict ended without {tmp}")
    tmp.rename(preds)
    if not (raw / "labelsTs").is_dir():
        _say(f"no {raw / 'labelsTs'}: predictions in {preds}, no evaluation table")
        return
    from .evaluate import evaluate_command

    _invoke(evaluate_command, ["--pred", str(preds), "--truth", str(raw / "labelsTs"), "-o", str(table),
                               "--summary", str(summary)])


def export_model(groups: ProcessGroups, dnum: str, dname: str, configuration: str, trainer: str, model: Path,
                 results: Path) -> None:
    """Zip all finished folds (temporary file, then renamed), unless the zip is newer than all of them."""
    zip_path = results / f"{dname}__{trainer}__nnUNetPlans__{configuration}.zip"
    done = finished_folds(model)
    if not done:
        return
    if zip_up_to_date(model, zip_path):
        _say(f"up to date: model zip {zip_path}")
        return
    tmp = zip_path.with_name(zip_path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    groups.run(["nnUNetv2_export_model_to_zip", "-d", dnum, "-o", str(tmp), "-c", configuration, "-tr", trainer,
                "-f", *map(str, done)])
    if not tmp.is_file():
        raise TrainStop(f"nnUNetv2_export_model_to_zip ended without {tmp}")
    tmp.rename(zip_path)
    _say(f"model zip (folds {' '.join(map(str, done))}): {zip_path}")


@click.command("train")
@click.option("--dnum", default="300", show_default=True, help="dataset number (DNUM)")
@click.option("--gpu", default="0", show_default=True, help="CUDA device id, or cpu (GPU)")
@click.option("--fold", default="0", show_default=True, help="0..4, or all (FOLD)")
@click.option("--config", default=None, help="split config building the raw dataset when absent (CONFIG)")
@click.option("--trainer", default="nnUNetTrainer", show_default=True, help="nnU-Net trainer class (TRAINER)")
@click.option("--configuration", default="3d_fullres", show_default=True,
              help="nnU-Net configuration, e.g. 3d_fullres_small (CONFIGURATION)")
@click.option("--force", is_flag=True, help="re-plan, re-preprocess and retrain from scratch (FORCE=1)")
def train_command(dnum, gpu, fold, config, trainer, configuration, force):
    """Plan, preprocess, train, evaluate on imagesTs and export an nnU-Net v2 model (see bin/train.sh).

    Needs nnUNet_raw, nnUNet_preprocessed and nnUNet_results in the environment (env.sh sets them).
    """
    try:
        train(dnum, gpu, fold, config, trainer, configuration, force)
    except TrainStop as stop:
        if str(stop):
            _err(str(stop))
        sys.exit(stop.code)
