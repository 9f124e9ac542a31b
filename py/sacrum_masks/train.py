"""``sacrum-masks train`` (stage 3, ``make train`` / bin/train.sh): plan, preprocess, split, train, evaluate, export.

For the dataset ``$nnUNet_raw/Dataset<DNUM>_<name>`` (built by bin/dataset.sh from ``--config`` when
absent) and the model folder ``M = $nnUNet_results/Dataset<DNUM>_<name>/<TRAINER>__nnUNetPlans__<CONFIGURATION>``,
in stages (``--stage``, env ``TRAIN_STAGE``; ``all`` runs the three; bin/slurm_train.sh calls them one by one):

``prepare``
    ``nnUNetv2_plan_and_preprocess`` unless the stamp ``.sacrum-raw-fingerprint-<config>`` in the
    preprocessed folder holds the raw dataset's :func:`raw_fingerprint` (``3d_fullres_small`` is planned as
    ``3d_fullres`` and added by ``sacrum-masks add-plans``), then ``splits_final.json`` from the config
    (:mod:`sacrum_masks.splits`: fold 0 = TRAINING/VALIDATION, folds 1-4 grouped by person). Under the
    dataset lock ``$nnUNet_results/.Dataset<DNUM>.train.lock``: exclusive when something has to change;
    when folds are training (they hold it shared) only an up-to-date preparation goes on.
``fold``
    each fold of ``--fold`` (:mod:`sacrum_masks.folds`: ``0``..``4``, a list, ``all`` = ``fold_all``) under
    its own lock ``$nnUNet_results/.Dataset<DNUM>.<model>.fold_<F>.lock`` (dataset lock shared), so
    ``FOLD=1 GPU=1`` trains beside ``FOLD=0 GPU=0``. A fold is kept when finished, resumed with ``--c``
    from ``checkpoint_latest.pth``, or trained from scratch (:func:`fold_state`); afterwards the cases
    nnU-Net validated are compared with the fold's ``val`` list. ``--gpu 0,1`` (or ``cpu,cpu``) runs the
    folds side by side, one child ``--stage fold`` per entry at a time (log ``M/train_fold_<F>.log``); a
    failed fold is named, the others finish, the exit status is 1.
``finish``
    once every fold of ``--fold`` has ``checkpoint_final.pth`` and ``checkpoint_best.pth``: the test
    split is segmented from its original images through stage 4's code path and defaults
    (``sacrum-masks evaluate-model``, :mod:`sacrum_masks.model_eval`; the folds as one ensemble) into
    ``M/evaluation_fold<F>[-<F>...].csv`` / ``.txt``; then every finished fold is exported, with both
    checkpoints, to ``$nnUNet_results/<dataset>__<TRAINER>__nnUNetPlans__<CONFIGURATION>.zip``.

The device of every ``--gpu`` entry is checked first (``sacrum-masks check-device``, in a child process so
that no CUDA context stays in this one), before anything is written. nnU-Net's worker counts
(``nnUNet_def_n_proc``, ``nnUNet_n_proc_DA``) default to the CPU count shared by the folds running at once.
Every nnU-Net command runs in its own process group (its data-augmentation workers included); on
SIGINT or SIGTERM the groups are terminated (SIGTERM, then SIGKILL 2 s later) and the command exits
128 + signal number (130, 143). The lock files are inherited by the nnU-Net commands, so that orphaned
workers of a killed run still hold them.
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


def finished_folds(model: Path) -> list:
    """Folds of a model folder (``0`` .. ``4``, ``all``) that have both ``checkpoint_final.pth`` and
    ``checkpoint_best.pth`` (what the export zip carries and stage 4 loads by default)."""
    from .folds import available_folds

    best = set(available_folds(model, "best"))
    return [f for f in available_folds(model, "final") if f in best]


def zip_up_to_date(model: Path, zip_path: Path) -> bool:
    """True when ``zip_path`` exists and no finished fold's checkpoint (final or best) is newer than it."""
    from .folds import fold_dir

    return zip_path.is_file() and not any(
        newer(fold_dir(model, f) / f"checkpoint_{c}.pth", zip_path) for f in finished_folds(model)
        for c in ("final", "best"))


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
    """Runs commands, each in its own session (process group), and kills them all on a signal.

    :meth:`install` makes SIGINT and SIGTERM terminate the running groups (SIGTERM, then SIGKILL after
    ``grace`` seconds), print ``train: interrupted by SIG<NAME>; ...`` and exit 128 + signal number.
    :meth:`run` runs one command and waits; :meth:`start` starts one and returns it (folds side by side).
    """

    def __init__(self, pass_fds: tuple[int, ...] = (), grace: float = 2.0):
        self.pass_fds = pass_fds
        self.grace = grace
        self.children: list[subprocess.Popen] = []

    @property
    def child(self) -> subprocess.Popen | None:
        return self.children[-1] if self.children else None

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)   # a second signal ends this process at once
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        children = list(self.children)
        for sig, pause in ((signal.SIGTERM, self.grace), (signal.SIGKILL, 0)):
            for child in children:
                try:
                    os.killpg(child.pid, sig)
                except ProcessLookupError:
                    pass
            if children:
                time.sleep(pause)
        # no child.wait() here: an interrupted Popen.wait() holds its lock; init reaps the children
        _err(f"interrupted by {signal.Signals(signum).name}; run the same command again to resume")
        sys.exit(128 + signum)

    def start(self, argv: list[str], env: dict[str, str] | None = None, stdout=None) -> subprocess.Popen:
        """Start ``argv`` in a new session (output to ``stdout``, default inherited); it is killed on a signal."""
        child = subprocess.Popen(argv, env=env, start_new_session=True, pass_fds=self.pass_fds,
                                 stdout=stdout, stderr=subprocess.STDOUT if stdout is not None else None)
        self.children.append(child)
        return child

    def finished(self, child: subprocess.Popen) -> int:
        """Forget a child that has ended; its status (128 + signal number when a signal ended it)."""
        rc = child.wait()
        if child in self.children:
            self.children.remove(child)
        return 128 - rc if rc < 0 else rc

    def run(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        """Run ``argv`` in a new session and wait; raise :class:`TrainStop` with its status when it fails.

        The status is the command's exit status, or 128 + signal number when a signal ended it.
        """
        child = self.start(argv, env)
        rc = self.finished(child)
        if rc:
            raise TrainStop("", rc)


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


# ---------------------------------------------------------------- locks

def _open_lock(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)


def _try_lock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def gpu_slots(gpu: str) -> list[str]:
    """The devices folds run on side by side: ``"0,1"`` -> ``["0", "1"]``; ``"cpu"`` -> ``["cpu"]``;
    ``"cpu,cpu"`` -> two folds side by side on the CPU.

    >>> gpu_slots("0,1"), gpu_slots("cpu"), gpu_slots(" cpu , cpu "), gpu_slots("1")
    (['0', '1'], ['cpu'], ['cpu', 'cpu'], ['1'])
    >>> gpu_slots("0,,1")
    Traceback (most recent call last):
    ...
    ValueError: GPU=0,,1: expected cpu, a CUDA device id, or a list of them (0,1 or cpu,cpu)
    """
    parts = [p.strip().lower() for p in gpu.split(",")]
    if not parts or any(not (p == "cpu" or p.isdigit()) for p in parts):
        raise ValueError(f"GPU={gpu}: expected cpu, a CUDA device id, or a list of them (0,1 or cpu,cpu)")
    return parts


def worker_counts(n_parallel: int, cpus: int | None = None) -> dict[str, str]:
    """``nnUNet_def_n_proc`` and ``nnUNet_n_proc_DA`` for ``n_parallel`` nnU-Net runs sharing ``cpus`` cores.

    nnU-Net's defaults (8 export and preprocessing workers, 12 augmentation workers) are sized for a
    GPU server; on a 2-core machine they only add contention. Each run gets its share of the cores
    (at least 1). Values already in the environment win (see :func:`nnunet_env`).

    >>> worker_counts(1, 2), worker_counts(2, 16)
    ({'nnUNet_def_n_proc': '2', 'nnUNet_n_proc_DA': '2'}, {'nnUNet_def_n_proc': '8', 'nnUNet_n_proc_DA': '8'})
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = str(max(1, cpus // max(1, n_parallel)))
    return {"nnUNet_def_n_proc": share, "nnUNet_n_proc_DA": share}


def nnunet_env(env: dict[str, str], n_parallel: int = 1) -> dict[str, str]:
    """``env`` (a copy) with nnU-Net's worker counts set from the CPU count, unless already set, and glibc's
    malloc told to keep freed memory (:func:`sacrum_masks.memory.tunables_env`: a training step on the CPU
    took 0.97 s with glibc's defaults, 0.52 s with it; ``SACRUM_MALLOC=system`` leaves the defaults).

    >>> e = nnunet_env({"nnUNet_def_n_proc": "1"}); e["nnUNet_def_n_proc"], "mmap_max=0" in e["GLIBC_TUNABLES"]
    ('1', True)
    >>> "GLIBC_TUNABLES" in nnunet_env({"SACRUM_MALLOC": "system"})
    False
    """
    from .memory import tunables_env

    return {**worker_counts(n_parallel), **env, **tunables_env(env)}


# ---------------------------------------------------------------- the stages

STAGES = ("prepare", "fold", "finish", "all")


class Run:
    """What every stage of one ``sacrum-masks train`` call needs (paths, names, the fold list, locks)."""

    def __init__(self, dnum: str, gpu: str, fold: str, config: str | None, trainer: str, configuration: str,
                 force: bool):
        from .folds import parse_folds

        try:
            self.prefix = dataset_prefix(dnum)
            self.folds = parse_folds(fold)
            self.slots = gpu_slots(gpu)
        except ValueError as exc:
            raise TrainStop(str(exc), 2) from None
        bad = [f for f in self.folds if f != "all" and f > 4]
        if bad:
            raise TrainStop(f"FOLD={fold}: expected fold numbers 0 to 4 or all", 2)
        self.dnum, self.gpu, self.config, self.trainer = dnum, gpu, config, trainer
        self.configuration, self.force = configuration, force
        self.raw_root, self.pp_root, self.results = (_nnunet_dir(v) for v in
                                                     ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
        self.groups = ProcessGroups()
        self.groups.install()
        self.devices: dict[str, str] = {}
        self.dname: str | None = None
        self.lock_fd: int | None = None

    # names
    @property
    def model_name(self) -> str:
        return f"{self.trainer}__nnUNetPlans__{self.configuration}"

    @property
    def model(self) -> Path:
        return self.results / self.dname / self.model_name

    @property
    def lock_path(self) -> Path:
        return self.results / f".{self.prefix}.train.lock"

    def fold_lock_path(self, fold) -> Path:
        return self.results / f".{self.prefix}.{self.model_name}.fold_{fold}.lock"

    def device(self, slot: str) -> str:
        """nnU-Net's ``-device`` for a slot, checked once (in a child process)."""
        if slot not in self.devices:
            self.devices[slot] = check_device_in_child(slot)
            if self.devices[slot] == "cpu" and self.trainer == "nnUNetTrainer_SacrumCPU":
                _err(f"warning: training on the CPU (GPU=cpu): minutes with the small {self.trainer} on small "
                     f"images, far longer on real ones")
            elif self.devices[slot] == "cpu":
                _err(f"warning: training {self.trainer} on the CPU (GPU=cpu) is very slow (days for a full "
                     f"nnU-Net training); give a GPU id")
        return self.devices[slot]

    def find(self) -> None:
        """The raw dataset's name (stage 2 builds it when absent and a config is given); number conflicts."""
        dname = find_dataset(self.raw_root, self.prefix)
        if dname is None:
            if not self.config:
                raise TrainStop(f"no {self.prefix}_* in {self.raw_root}: give CONFIG=<split.json> to build it "
                                f"(stage 2), or run make dataset first")
            _say(f"no {self.prefix}_* in {self.raw_root}: building it from {self.config} (stage 2)")
            stage2_env = {**os.environ, "DNUM": self.dnum, "CONFIG": self.config, "FORCE": "1" if self.force else "0"}
            self.groups.run(["bash", str(DATASET_SH)], env=stage2_env)
            dname = find_dataset(self.raw_root, self.prefix)
            if dname is None:
                raise TrainStop(f"stage 2 did not create {self.prefix}_* in {self.raw_root}")
        for other in (self.pp_root, self.results):
            there = find_dataset(other, self.prefix)
            if there is not None and there != dname:
                raise TrainStop(f"{other}/{there} has the number of {self.raw_root}/{dname}; nnU-Net refuses to "
                                f"run: remove or renumber one")
        self.dname = dname
        self.pp_root.mkdir(parents=True, exist_ok=True)
        self.results.mkdir(parents=True, exist_ok=True)

    def lock_shared(self) -> None:
        """The dataset lock, shared (folds and finish run beside each other, not beside a re-planning)."""
        if self.lock_fd is None:
            self.lock_fd = _open_lock(self.lock_path)
            if not _try_lock(self.lock_fd, fcntl.LOCK_SH):
                raise TrainStop(f"another training of {self.dname} is running (lock {self.lock_path})", EXIT_BUSY)
            self.groups.pass_fds = (self.lock_fd,)   # nnU-Net's processes hold it too (orphans of a killed run)

    @property
    def fingerprint(self) -> str:
        return raw_fingerprint(self.raw_root / self.dname)


def prepare(run: Run) -> None:
    """Plan, preprocess and write ``splits_final.json`` under the dataset lock.

    The lock is taken exclusively; when folds of the dataset are training (they hold it shared), the
    preparation goes on only if nothing has to change, so ``make train FOLD=1`` starts beside a running
    ``FOLD=0``. It is left shared for the stages that follow in the same process.
    """
    from .splits import SplitError, ensure_splits

    run.find()
    dname, pp_dir = run.dname, run.pp_root / run.dname
    fd = _open_lock(run.lock_path)
    exclusive = _try_lock(fd, fcntl.LOCK_EX)
    if not exclusive and not _try_lock(fd, fcntl.LOCK_SH):
        os.close(fd)
        raise TrainStop(f"another training of {dname} is running (lock {run.lock_path})", EXIT_BUSY)
    run.lock_fd = fd
    run.groups.pass_fds = (fd,)
    pp_config = PREPROCESSED_AS.get(run.configuration, run.configuration)
    stamp = pp_dir / f".sacrum-raw-fingerprint-{pp_config}"
    fingerprint = run.fingerprint
    if plans_up_to_date(pp_dir, pp_config, fingerprint, run.force):
        _say(f"up to date: plan and preprocess {dname} {pp_config}")
    else:
        if not exclusive:
            raise TrainStop(f"folds of {dname} are training (lock {run.lock_path}); planning and preprocessing "
                            f"again has to wait until they end", EXIT_BUSY)
        stamp.unlink(missing_ok=True)
        _say(f"plan and preprocess {dname} {pp_config}")
        # nnUNet_n_proc_DA=0 (augment in the main process) breaks planning: it is for training only
        plan_env = {k: v for k, v in nnunet_env(dict(os.environ)).items() if k != "nnUNet_n_proc_DA"}
        run.groups.run(["nnUNetv2_plan_and_preprocess", "-d", run.dnum, "-c", pp_config,
                        "--verify_dataset_integrity", "-np", plan_env["nnUNet_def_n_proc"],
                        "-npfp", plan_env["nnUNet_def_n_proc"]], env=plan_env)
        stamp.write_text(fingerprint + "\n", encoding="utf-8")
    if run.configuration == "3d_fullres_small":
        from .plans import add_plans_command

        _invoke(add_plans_command, [str(pp_dir / "nnUNetPlans.json"), "--name", run.configuration])
    try:
        ensure_splits(run.raw_root / dname, pp_dir, run.folds, force=run.force, say=_say)
    except SplitError as exc:
        raise TrainStop(str(exc), 2) from None
    if exclusive:
        fcntl.flock(fd, fcntl.LOCK_SH)


def train_folds(run: Run) -> list:
    """Train the folds of ``run``, one per slot at a time; the folds that failed (named on stderr)."""
    if run.dname is None:
        run.find()
    run.lock_shared()
    for slot in dict.fromkeys(run.slots):
        run.device(slot)
    if len(run.slots) == 1 or len(run.folds) == 1:
        failed = []
        for f in run.folds:
            try:
                train_one(run, f, run.slots[0])
            except TrainStop as stop:
                if str(stop):
                    _err(str(stop))
                _err(f"fold {f} failed (status {stop.code})")
                if stop.code == EXIT_BUSY and len(run.folds) == 1:
                    raise TrainStop("", EXIT_BUSY) from None
                failed.append(f)
        return failed
    return _schedule(run)


def _schedule(run: Run) -> list:
    """Folds side by side, one child ``sacrum-masks train --stage fold`` per slot; logs in the model folder."""
    from .folds import format_folds

    run.model.mkdir(parents=True, exist_ok=True)
    queue, running, failed = list(run.folds), {}, []
    free = list(run.slots)
    env = nnunet_env(dict(os.environ), len(run.slots))
    code = "from sacrum_masks.cli import main; main(prog_name='sacrum-masks')"
    while queue or running:
        while queue and free:
            f, slot = queue.pop(0), free.pop(0)
            log = run.model / f"train_fold_{f}.log"
            argv = [sys.executable, "-c", code, "train", "--stage", "fold", "--dnum", run.dnum, "--gpu", slot,
                    "--fold", str(f), "--trainer", run.trainer, "--configuration", run.configuration]
            if run.force:
                argv.append("--force")
            with open(log, "w", encoding="utf-8") as fh:
                child = run.groups.start(argv, env=env, stdout=fh)
            running[child.pid] = (child, f, slot, log)
            _say(f"fold {f} on {'the CPU' if slot == 'cpu' else 'GPU ' + slot}: log {log}")
        pid, _status = os.wait()
        if pid not in running:
            continue
        child, f, slot, log = running.pop(pid)
        child.returncode = os.waitstatus_to_exitcode(_status)
        rc = run.groups.finished(child)
        free.append(slot)
        if rc:
            tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] if log.is_file() else []
            _err(f"fold {f} failed (status {rc}; {log}){': ' + tail[0] if tail else ''}")
            failed.append(f)
        else:
            _say(f"fold {f} done")
    if failed:
        _err(f"folds that failed: {format_folds(failed)}; the others finished")
    return failed


def train_one(run: Run, fold, slot: str) -> None:
    """One fold under its own lock: train (or resume, or keep), then check the split nnU-Net used."""
    from .folds import fold_dir
    from .splits import SPLITS, check_trained_split

    fd = _open_lock(run.fold_lock_path(fold))
    try:
        if not _try_lock(fd, fcntl.LOCK_EX):
            raise TrainStop(f"fold {fold} of {run.dname} is being trained by another run "
                            f"(lock {run.fold_lock_path(fold)})", EXIT_BUSY)
        device = run.device(slot)
        env = nnunet_env(_with_device(dict(os.environ), device, slot), len(run.slots))
        groups = run.groups
        saved = groups.pass_fds
        groups.pass_fds = (*saved, fd)
        try:
            trained = train_fold(groups, env, run.dnum, run.configuration, fold, run.trainer, device, run.model,
                                 run.fingerprint, run.force)
        finally:
            groups.pass_fds = saved
        splits = run.pp_root / run.dname / SPLITS
        stamp = run.pp_root / run.dname / ".sacrum-splits-sha256"
        if fold != "all" and splits.is_file() and stamp.is_file():
            problem = check_trained_split(fold_dir(run.model, fold), fold, splits)
            if problem and trained:
                raise TrainStop(problem)
            if problem:
                _err(f"warning: {problem}")
            elif trained:
                _say(f"fold {fold}: nnU-Net validated exactly the val cases of {splits.name} fold {fold}")
        if not (fold_dir(run.model, fold) / "checkpoint_best.pth").is_file():
            raise TrainStop(f"{fold_dir(run.model, fold)} has no checkpoint_best.pth")
    finally:
        os.close(fd)


def train_fold(groups: ProcessGroups, env: dict[str, str], dnum: str, configuration: str, fold,
               trainer: str, device: str, model: Path, fingerprint: str, force: bool) -> bool:
    """Train (or resume, or keep) one fold; True when it was trained now, False when kept.

    :class:`TrainStop` when no ``checkpoint_final.pth`` results.
    """
    from .folds import fold_dir as folder_of

    fold_dir = folder_of(model, fold)
    state = fold_state(fold_dir, fingerprint, force)
    if state == "done":
        _say(f"up to date: fold {fold} of {model} (FORCE=1 retrains)")
        return False
    args = ["nnUNetv2_train", dnum, configuration, str(fold), "-tr", trainer, "-device", device]
    if state == "resume":
        _say(f"resuming fold {fold} from {fold_dir / 'checkpoint_latest.pth'}")
        args.append("--c")
    else:
        _say(f"training fold {fold}: {trainer} {configuration} on {device}")
        fold_dir.mkdir(parents=True, exist_ok=True)
        for old in fold_dir.glob("checkpoint_*.pth"):
            old.unlink(missing_ok=True)
        _remove(fold_dir / "validation")
        (fold_dir / ".sacrum-raw-fingerprint").write_text(fingerprint + "\n", encoding="utf-8")
    groups.run(args, env=env)
    final = fold_dir / "checkpoint_final.pth"
    if not final.is_file():
        raise TrainStop(f"nnUNetv2_train ended without {final}")
    return True


def finish(run: Run) -> int:
    """Evaluate ``run.folds`` as stage 4 uses them, then export every finished fold; the exit status."""
    from .errors import InputError
    from .folds import check_folds

    if run.dname is None:
        run.find()
    run.lock_shared()
    try:
        for ckpt in ("final", "best"):
            check_folds(run.model, run.folds, ckpt)
    except InputError as exc:
        raise TrainStop(f"{exc}; train them first (--stage fold)") from None
    status = evaluate_model_stage(run)
    export_model(run.groups, run.dnum, run.dname, run.configuration, run.trainer, run.model, run.results)
    return status


def evaluation_names(model: Path, folds) -> tuple[Path, Path, Path]:
    """``(table, summary, masks folder)`` of the evaluation of ``folds``: ``evaluation_fold0.csv``,
    ``evaluation_fold0-1-2.csv``, ``evaluation_foldall.csv`` (+ ``.txt``; masks in ``evaluation_fold<...>/``)."""
    tag = "-".join(str(f) for f in folds)
    return (model / f"evaluation_fold{tag}.csv", model / f"evaluation_fold{tag}.txt", model / f"evaluation_fold{tag}")


def evaluate_model_stage(run: Run) -> int:
    """The TESTING images through stage 4's code path (child process ``sacrum-masks evaluate-model``)."""
    from .folds import fold_dir, format_folds
    from .model_eval import held_out_cases

    table, summary, masks = evaluation_names(run.model, run.folds)
    raw = run.raw_root / run.dname
    if not held_out_cases(raw):
        _say(f"no test cases in {raw} (TESTING / imagesTs with labelsTs): no evaluation")
        return 0
    checkpoints = [fold_dir(run.model, f) / f"checkpoint_{c}.pth" for f in run.folds for c in ("best", "final")]
    if table.is_file() and summary.is_file() and masks.is_dir() and not any(newer(c, table) for c in checkpoints):
        line = summary.read_text(encoding="utf-8", errors="replace").rstrip("\n")
        _say(f"up to date: {line}")
        return 0
    slot = run.slots[0]
    device = run.device(slot)
    env = nnunet_env(_with_device(dict(os.environ), device, slot))
    code = "from sacrum_masks.cli import main; main(prog_name='sacrum-masks')"
    _say(f"evaluating folds {format_folds(run.folds)} on the test split as stage 4 segments it")
    try:
        run.groups.run([sys.executable, "-c", code, "evaluate-model", "--model", str(run.model), "--raw", str(raw),
                        "--fold", format_folds(run.folds), "--device", "cpu" if device == "cpu" else "cuda",
                        "-o", str(table), "--summary", str(summary), "--masks", str(masks)], env=env)
    except TrainStop as stop:
        _err(f"evaluation of folds {format_folds(run.folds)} failed (status {stop.code})")
        return 1
    return 0


def export_model(groups: ProcessGroups, dnum: str, dname: str, configuration: str, trainer: str, model: Path,
                 results: Path) -> None:
    """Zip every finished fold with checkpoint_final and checkpoint_best (temporary file, then renamed),
    unless the zip is newer than all of them."""
    from .folds import format_folds

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
                "-f", *map(str, done), "-chk", "checkpoint_final.pth", "checkpoint_best.pth"])
    if not tmp.is_file():
        raise TrainStop(f"nnUNetv2_export_model_to_zip ended without {tmp}")
    tmp.rename(zip_path)
    _say(f"model zip (folds {format_folds(done)}, checkpoints final and best): {zip_path}")


def train(dnum: str, gpu: str, fold: str, config: str | None, trainer: str, configuration: str,
          force: bool, stage: str = "all") -> int:
    """Stage 3 for dataset ``dnum`` (see the module docstring); the exit status, or :class:`TrainStop`."""
    from .folds import format_folds

    run = Run(dnum, gpu, fold, config, trainer, configuration, force)
    if stage in ("all", "fold"):
        for slot in dict.fromkeys(run.slots):   # before anything is written
            run.device(slot)
    if stage in ("all", "prepare"):
        prepare(run)
    if stage == "prepare":
        return 0
    if stage in ("all", "fold"):
        failed = train_folds(run)
        if failed:
            if stage == "all":
                _err(f"not evaluated or exported: fold {format_folds(failed)} failed; run the same command "
                     f"again to retry")
            return 1
    if stage in ("all", "finish"):
        return finish(run)
    return 0


@click.command("train")
@click.option("--dnum", default="300", show_default=True, help="dataset number (DNUM)")
@click.option("--gpu", default="0", show_default=True,
              help="CUDA device id, cpu, or a list (0,1 or cpu,cpu): folds side by side, one per entry (GPU)")
@click.option("--fold", default="0", show_default=True, help='0..4, a list ("0 1 2 3 4"), or all = fold_all (FOLD)')
@click.option("--config", default=None, help="split config building the raw dataset when absent (CONFIG)")
@click.option("--trainer", default="nnUNetTrainer", show_default=True, help="nnU-Net trainer class (TRAINER)")
@click.option("--configuration", default="3d_fullres", show_default=True,
              help="nnU-Net configuration, e.g. 3d_fullres_small (CONFIGURATION)")
@click.option("--stage", type=click.Choice(STAGES), default="all", show_default=True, envvar="TRAIN_STAGE",
              help="prepare (plan, preprocess, splits), fold (train each fold), finish (evaluate, export), "
                   "or all (TRAIN_STAGE)")
@click.option("--force", is_flag=True, help="re-plan, re-preprocess and retrain from scratch (FORCE=1)")
def train_command(dnum, gpu, fold, config, trainer, configuration, stage, force):
    """Plan, preprocess, train, evaluate on the test split and export an nnU-Net v2 model (see bin/train.sh).

    Needs nnUNet_raw, nnUNet_preprocessed and nnUNet_results in the environment (env.sh sets them).
    """
    try:
        code = train(dnum, gpu, fold, config, trainer, configuration, force, stage)
    except TrainStop as stop:
        if str(stop):
            _err(str(stop))
        sys.exit(stop.code)
    sys.exit(code)
