"""Stage 4 engine: readers in worker processes, the network in the main process, export in the same pool.

Modelled on nnU-Net's ``predict_from_data_iterator`` / ``data_iterators``, for our per-image contracts:

* **Readers** (a pool of ``P`` single-threaded worker processes): load the image, reorient to RPI, lay
  it out as nnU-Net's reader does (:func:`sacrum_masks.predict.nnunet_input`) and run the plans'
  preprocessor (``configuration_manager.preprocessor_class().run_case_npy``), as
  ``predict_single_npy_array`` does. At most ``P + 1`` images are read ahead (a bounded queue).
* **Network** (main process, the chosen device, ``T`` torch threads): one fold, or a fold ensemble whose
  logits are summed and divided by the number of folds (``predict_logits_from_preprocessed_data``, as
  ``nnUNetv2_predict -f 0 1 2 3 4``). For an ensemble each fold's argmax is kept to measure the folds'
  agreement (mean pairwise Dice, on the network's grid).
* **Export** (same pool, at most ``P + 1`` in flight): resample the logits back to the image
  (``resampling_fn_probabilities``), argmax (nnU-Net's ``convert_logits_to_segmentation``, so the mask is
  voxel for voxel that of the serial path :func:`sacrum_masks.predict.segment_image`), softmax, revert
  the crop and the transpose, keep the largest component, restore the image's voxel order, compute the
  boundary entropy, and call the **sink** (built by predict.py; it writes the outputs atomically).

Failures: any exception for one image, in any step, is that image's ``failed`` report; the others go
on. A worker process that dies (killed for memory) fails the images it had in flight and the pool is
started again. SIGTERM or Ctrl-C terminates every worker, removes their temporary files (the sink's
``cleanup``) and re-raises in the main process.

Schedules (:func:`choose_schedule`): the pipeline above runs on a GPU and from 4 CPUs on. With a CPU
network on fewer CPUs the same steps (the same functions) run **in line** in the main process, one image
after another: there the network needs every CPU, and processes beside it cost it more than they save.

Threads: ``workers`` is the CPU allocation (``--workers``, else ``SLURM_CPUS_PER_TASK``, else the CPUs
this process may use). :func:`thread_plan` splits it into ``P`` worker processes of one thread each and
``T = workers - P`` torch threads for the network, so the total never exceeds it.

Memory: the run keeps freed memory for reuse (:mod:`sacrum_masks.memory`, set by predict.py and by each
worker process): without it every forward pass page-faults its activations afresh.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import io
from concurrent.futures.process import BrokenProcessPool
import math
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

#: CPU presets of ``--preset`` (chosen from ``bench/bench_engine.py``'s CPU settings rows; README
#: "Stage 4 engine": fastest combination whose agreement Dice with the reference settings is >= 0.99)
PRESETS = {
    "default": {"tile_step": 0.5, "mirroring": False, "bf16": False},
    "fast": {"tile_step": 1.0, "mirroring": False, "bf16": True},
}


def cpu_bf16_supported() -> bool:
    """True when oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX); elsewhere bf16 is slow."""
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError, ImportError):
        return False


def preset_settings(name: str | None, device: str) -> dict:
    """The settings of a preset for a device: bf16 autocast only on a CPU that runs it natively.

    >>> preset_settings("default", "cpu")["tile_step"], preset_settings("fast", "cuda")["bf16"]
    (0.5, False)
    """
    chosen = dict(PRESETS[name or "default"])
    if chosen["bf16"] and not (device == "cpu" and cpu_bf16_supported()):
        chosen["bf16"] = False
    return chosen


# ------------------------------------------------------------------------------------------ allocation


def cpu_allocation(env=None) -> int:
    """CPUs this run may use: ``SLURM_CPUS_PER_TASK`` when set, else the CPUs of this process's affinity.

    >>> cpu_allocation({"SLURM_CPUS_PER_TASK": "4"})
    4
    """
    env = os.environ if env is None else env
    slurm = str(env.get("SLURM_CPUS_PER_TASK", "")).strip()
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # not Linux
        return max(1, os.cpu_count() or 1)


#: below this many CPUs a CPU network runs in line with the reads and exports (see :func:`choose_schedule`)
SMALL_ALLOCATION = 4
#: the schedules of :func:`run` (``auto``: :func:`choose_schedule`)
SCHEDULES = ("auto", "pipeline", "inline")


def choose_schedule(schedule: str, device: str, workers: int) -> str:
    """``pipeline`` or ``inline`` for a run; ``auto`` picks by the device and the CPU allocation.

    The pipeline (reader and export processes beside the network) pays when the network leaves CPUs
    idle: on a GPU, or from :data:`SMALL_ALLOCATION` CPUs on, where the processes get CPUs of their own.
    Below that a CPU network needs every CPU, and worker processes beside it slow its passes more than
    the work they take off it (measured on 2 cores at real size, ``bench/bench_engine.py`` row (c): the
    passes took 1.22x as long), so the same steps run in line, one image after another, in the main process.

    >>> choose_schedule("auto", "cpu", 2), choose_schedule("auto", "cpu", 8), choose_schedule("auto", "cuda", 2)
    ('inline', 'pipeline', 'pipeline')
    >>> choose_schedule("pipeline", "cpu", 2)
    'pipeline'
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if schedule != "auto":
        return schedule
    return "pipeline" if str(device).split(":")[0] != "cpu" or workers >= SMALL_ALLOCATION else "inline"


def thread_plan(workers: int, n_images: int | None = None, schedule: str = "pipeline") -> tuple[int, int]:
    """``(P, T)``: worker processes (one thread each) and network torch threads for ``workers`` CPUs.

    In line, no worker process and every CPU for the network. Pipelined from :data:`SMALL_ALLOCATION`
    CPUs on, ``P`` is a quarter of the allocation (at most the number of images) and ``T`` the rest, so
    ``P + T <= workers``. Pipelined below it (on a GPU, or asked for), one worker process runs at nice
    :data:`WORKER_NICE` beside a network that keeps every CPU.

    >>> thread_plan(2, schedule="inline"), thread_plan(1), thread_plan(2), thread_plan(4), thread_plan(16)
    ((0, 2), (1, 1), (1, 2), (1, 3), (4, 12))
    >>> thread_plan(16, n_images=2)
    (2, 14)
    """
    workers = max(1, int(workers))
    if schedule == "inline":
        return 0, workers
    if workers < SMALL_ALLOCATION:
        return 1, workers
    p = max(1, workers // 4)
    if n_images is not None:
        p = max(1, min(p, n_images))
    return p, max(1, workers - p)


#: niceness of the one worker process when it shares the network's CPUs
WORKER_NICE = 10


# ----------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelSpec:
    """What the network is: picklable, so worker processes can load the plans it names.

    ``folds`` as :func:`sacrum_masks.folds.parse_folds` gives them (several = an ensemble).
    """

    model_dir: Path
    folds: tuple = (0,)
    checkpoint: str = "best"
    device: str = "cpu"
    tile_step: float = 0.5
    mirroring: bool = False
    bf16: bool = False
    compile: bool = False


class _Bf16(object):
    """Runs a network under CPU bfloat16 autocast and returns float32 logits."""

    def __new__(cls, network):
        import torch

        class Bf16Network(torch.nn.Module):
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, x):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return self.net(x).float()

            def load_state_dict(self, state, *a, **kw):
                return self.net.load_state_dict(state, *a, **kw)

        return Bf16Network(network)


#: trainers whose network is nnU-Net's own (they do not override ``build_network_architecture``): built
#: without importing the trainer. nnU-Net's trainer search imports trainer modules, and with them
#: matplotlib and seaborn (about 3 s of every run's model load), and for a trainer outside nnU-Net
#: (ours) it prints its search through every module first.
PLAIN_NETWORK_TRAINERS = frozenset({"nnUNetTrainer", "nnUNetTrainer_SacrumCPU"})


class _PlainNetworkTrainer:
    """Stands in for a trainer of :data:`PLAIN_NETWORK_TRAINERS`: nnUNetTrainer.build_network_architecture."""

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision=True):
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        cm = configuration_manager
        return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                      cm.network_arch_init_kwargs_req_import, num_input_channels, num_output_channels,
                                      allow_init=True, deep_supervision=enable_deep_supervision)


@contextlib.contextmanager
def plain_trainer_lookup():
    """nnU-Net's predictor finds :data:`PLAIN_NETWORK_TRAINERS` without importing them; any other by its search."""
    import nnunetv2.inference.predict_from_raw_data as pfr

    search = pfr.recursive_find_trainer_class_by_name

    def find(name, *args, **kwargs):
        return _PlainNetworkTrainer if name in PLAIN_NETWORK_TRAINERS else search(name, *args, **kwargs)

    pfr.recursive_find_trainer_class_by_name = find
    try:
        yield
    finally:
        pfr.recursive_find_trainer_class_by_name = search


def load_predictor(model_dir, folds, checkpoint: str, device: str, tile_step: float, mirroring: bool):
    """nnU-Net's predictor for a trained model folder, as the engine and the serial path both load it.

    Trainers of :data:`PLAIN_NETWORK_TRAINERS` are found without nnU-Net's trainer search; a plans file
    whose ``image_reader_writer`` we do not reproduce is one InputError.
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from .errors import InputError
    from .predict import PLAIN_READERS

    dev = torch.device(device)
    with contextlib.redirect_stdout(io.StringIO()):   # nnU-Net's notes on CPU devices: not for the log
        predictor = nnUNetPredictor(tile_step_size=tile_step, use_gaussian=True, use_mirroring=mirroring,
                                    perform_everything_on_device=dev.type == "cuda", device=dev,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    with plain_trainer_lookup():
        predictor.initialize_from_trained_model_folder(str(model_dir), use_folds=folds,
                                                       checkpoint_name=f"checkpoint_{checkpoint}.pth")
    reader = predictor.plans_manager.plans.get("image_reader_writer", "SimpleITKIO")
    if reader not in PLAIN_READERS:
        raise InputError(model_dir, f"plans.json image_reader_writer {reader!r} is not supported "
                         f"(expected one of {', '.join(PLAIN_READERS)})")
    return predictor


class Network:
    """An nnU-Net model (one fold or an ensemble) loaded once in the main process.

    :meth:`logits` returns the ensemble's logits on the preprocessed grid (as
    ``predict_logits_from_preprocessed_data``) and, for two folds or more, each fold's argmax.
    """

    def __init__(self, spec: ModelSpec, threads: int | None = None):
        import torch

        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        self.spec = spec
        self.predictor = load_predictor(spec.model_dir, tuple(spec.folds), spec.checkpoint, spec.device,
                                        spec.tile_step, spec.mirroring)
        if spec.bf16:
            self.predictor.network = _Bf16(self.predictor.network)
        if spec.compile:
            self.predictor.network = torch.compile(self.predictor.network)
        #: the configuration name the checkpoint was trained with (worker processes load its plans)
        self.configuration = configuration_name_of(self.predictor.plans_manager,
                                                   self.predictor.configuration_manager)
        self.forward_seconds = 0.0

    def logits(self, data) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """``(logits[c, z, y, x] float numpy, per-fold argmax masks or None)`` for preprocessed ``data``."""
        import torch

        data = torch.as_tensor(data)
        start = time.perf_counter()
        p = self.predictor
        try:
            if len(p.list_of_parameters) == 1:
                return p.predict_logits_from_preprocessed_data(data).cpu().numpy(), None
            # as predict_logits_from_preprocessed_data, keeping each fold's argmax on the way
            masks, total = [], None
            with torch.inference_mode():
                for params in p.list_of_parameters:
                    net = getattr(p.network, "_orig_mod", p.network)
                    net.load_state_dict(params)
                    one = p.predict_sliding_window_return_logits(data).to("cpu")
                    masks.append(p.label_manager.convert_logits_to_segmentation(one).numpy().astype(np.uint8))
                    total = one if total is None else total + one
                total /= len(p.list_of_parameters)
            return total.numpy(), masks
        finally:
            self.forward_seconds += time.perf_counter() - start


def configuration_name_of(plans_manager, configuration_manager) -> str:
    """The name, in the plans, of the configuration the predictor loaded (worker processes load it by name)."""
    for name in plans_manager.plans["configurations"]:
        if plans_manager.get_configuration(name).configuration == configuration_manager.configuration:
            return name
    raise RuntimeError("the checkpoint's configuration is not in plans.json")


# ------------------------------------------------------------------------------------ worker processes

_W: dict = {}


def _init_worker(model_dir: str, configuration: str, nice: int = 0) -> None:
    """Pool initializer: one thread, Ctrl-C left to the main process, SIGTERM unwinds (temporaries removed)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    from .memory import keep_freed_memory

    keep_freed_memory()
    if nice:
        os.nice(nice)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)
    import torch

    torch.set_num_threads(1)
    _load_state(model_dir, configuration)


def _load_state(model_dir: str, configuration: str) -> None:
    """What the reader and export tasks need: the plans, the configuration, the labels, the preprocessor."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = PlansManager(load_json(str(Path(model_dir) / "plans.json")))
    dataset_json = load_json(str(Path(model_dir) / "dataset.json"))
    cm = plans.get_configuration(configuration)
    _W.update(plans=plans, cm=cm, dataset_json=dataset_json, labels=plans.get_label_manager(dataset_json),
              preprocessor=cm.preprocessor_class(verbose=False))


class Terminated(SystemExit):
    """Raised in a worker by SIGTERM: unwinds the task (``finally`` blocks remove temporary files)."""


def _worker_sigterm(signum, frame):
    raise Terminated()


def read_case(image: str) -> dict:
    """Reader task: load, RPI, nnU-Net layout, the plans' preprocessing. Runs in a worker process."""
    from .nifti import load_image, to_rpi
    from .predict import nnunet_input

    img, data = load_image(image)
    rpi = to_rpi(img, data)
    array, spacing = nnunet_input(rpi, np.asanyarray(rpi.dataobj))
    pre, _, props = _W["preprocessor"].run_case_npy(array, None, {"spacing": list(spacing)}, _W["plans"], _W["cm"],
                                                    _W["dataset_json"])
    return {"data": np.ascontiguousarray(pre, dtype=np.float32), "props": props, "shape": tuple(array.shape[1:])}


def export_logits(logits: np.ndarray, props: dict, plans, cm, labels) -> tuple[np.ndarray, np.ndarray]:
    """``(segmentation, probabilities)`` on the grid of the array the reader gave the preprocessor.

    The segmentation is nnU-Net's (``convert_predicted_logits_to_segmentation_with_correct_shape``): the
    logits are resampled once, the argmax taken on them; the probabilities are their softmax, with the
    crop and the transpose reverted the same way.
    """
    import torch
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    spacing_t = [props["spacing"][i] for i in plans.transpose_forward]
    shape = props["shape_after_cropping_and_before_resampling"]
    current = cm.spacing if len(cm.spacing) == len(shape) else [spacing_t[0], *cm.spacing]
    resampled = cm.resampling_fn_probabilities(logits, shape, current, spacing_t)
    seg = labels.convert_logits_to_segmentation(resampled)
    probs = labels.apply_inference_nonlin(resampled)
    full = np.zeros(props["shape_before_cropping"], dtype=np.uint8 if len(labels.foreground_labels) < 255 else np.uint16)
    full = insert_crop_into_image(full, seg, props["bbox_used_for_cropping"])
    if isinstance(full, torch.Tensor):
        full = full.cpu().numpy()
    full = full.transpose(plans.transpose_backward)
    probs = labels.revert_cropping_on_probabilities(probs, props["bbox_used_for_cropping"], props["shape_before_cropping"])
    probs = probs.cpu().numpy() if isinstance(probs, torch.Tensor) else probs
    probs = probs.transpose([0] + [i + 1 for i in plans.transpose_backward])
    return full, probs


def boundary_band(mask: np.ndarray) -> np.ndarray:
    """Voxels within one voxel (faces) of the mask's surface, inside or outside.

    >>> m = np.zeros((5, 5, 5), bool); m[1:4, 1:4, 1:4] = True
    >>> int(boundary_band(m).sum()), bool(boundary_band(m)[2, 2, 2])
    (80, False)
    """
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    return ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)


def binary_entropy_bits(p: np.ndarray) -> np.ndarray:
    """``-p log2 p - (1 - p) log2 (1 - p)``, 0 at p = 0 or 1.

    >>> binary_entropy_bits(np.array([0.0, 0.5, 1.0])).tolist()
    [0.0, 1.0, 0.0]
    """
    p = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = 0.0 - (np.where(p > 0, p * np.log2(p), 0.0) + np.where(p < 1, (1 - p) * np.log2(1 - p), 0.0))
    return h


def boundary_entropy(mask: np.ndarray, fg_probability: np.ndarray) -> float | None:
    """Mean binary entropy (bits) of the foreground probability over :func:`boundary_band`; None if empty.

    >>> m = np.zeros((5, 5, 5), bool); m[1:4, 1:4, 1:4] = True
    >>> boundary_entropy(m, np.full(m.shape, 0.5)), boundary_entropy(m, m.astype(float))
    (1.0, 0.0)
    """
    band = boundary_band(mask)
    if not band.any():
        return None
    return round(float(binary_entropy_bits(fg_probability[band]).mean()), 6)


def mean_pairwise_dice(masks: list[np.ndarray]) -> float | None:
    """Mean Dice over every pair of masks (foreground = nonzero); None for fewer than two.

    Two empty masks agree (Dice 1).

    >>> a = np.array([1, 1, 0, 0]); b = np.array([1, 0, 0, 0])
    >>> mean_pairwise_dice([a, a]), round(mean_pairwise_dice([a, b]), 4), mean_pairwise_dice([a])
    (1.0, 0.6667, None)
    """
    if len(masks) < 2:
        return None
    fg = [np.asarray(m) != 0 for m in masks]
    scores = []
    for i in range(len(fg)):
        for j in range(i + 1, len(fg)):
            total = int(fg[i].sum() + fg[j].sum())
            scores.append(1.0 if total == 0 else 2.0 * int(np.logical_and(fg[i], fg[j]).sum()) / total)
    return round(float(np.mean(scores)), 6)


def reference_image(image: str):
    """The image's header and grid, without its voxels (as :func:`sacrum_masks.nifti.load_image` shapes it)."""
    import nibabel as nib

    img = nib.load(str(image))
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = nib.Nifti1Image(np.zeros(img.shape[:3], np.uint8), img.affine, img.header)
    return img


def export_case(job, image: str, logits: np.ndarray, props: dict, info: dict, sink, want_probabilities: bool):
    """Export task: back to the image's grid, largest component, uncertainty, then ``sink``. Runs in a worker."""
    from .components import largest_component
    from .nifti import from_rpi

    start = time.perf_counter()
    seg, probs = export_logits(logits, props, _W["plans"], _W["cm"], _W["labels"])
    del logits
    img = reference_image(image)
    kept, n_removed = largest_component(seg.transpose(2, 1, 0) != 0, 26)
    mask = np.ascontiguousarray(from_rpi(kept, img)).astype(np.uint8)
    fg = 1.0 - probs[0] if probs.shape[0] >= 2 else probs[0]
    fg = np.ascontiguousarray(from_rpi(np.asarray(fg, np.float32).transpose(2, 1, 0), img))
    info = dict(info, components_removed=int(n_removed), boundary_entropy=boundary_entropy(mask, fg),
                image=img, export_seconds=time.perf_counter() - start)
    return sink(job, mask, fg if want_probabilities else None, info)


def _call(fn, *args):
    """Runs one task in a worker; SIGTERM unwinds the task (its ``finally`` blocks run), then the worker exits."""
    try:
        return fn(*args)
    except Terminated:
        os._exit(128 + signal.SIGTERM)


# ------------------------------------------------------------------------------------------------- run


@dataclass
class Progress:
    """Per-image timings of a run (for the benchmark and the summary)."""

    images: int = 0
    forward_seconds: float = 0.0
    wall_seconds: float = 0.0
    model_load_seconds: float = 0.0
    schedule: str = ""
    per_image: list = field(default_factory=list)


def failure_reason(exc: BaseException) -> str:
    """One line for an exception of one image's step.

    >>> failure_reason(OSError(28, "No space left on device"))
    'cannot write or read (No space left on device)'
    >>> failure_reason(RuntimeError("boom\\nmore"))
    'RuntimeError: boom'
    """
    from .errors import InputError

    if isinstance(exc, InputError):
        return exc.reason
    if isinstance(exc, BrokenProcessPool):
        return "worker process died (killed for memory?)"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot write or read ({exc.strerror})"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class _Pool:
    """A spawn ProcessPoolExecutor that is started again after a worker died, and can be terminated.

    ``generation`` counts the starts: a future of an older generation failed with the pool it ran in.
    """

    def __init__(self, processes: int, initargs: tuple):
        self.processes, self.initargs = processes, initargs
        self.pool, self.generation = None, 0
        self.start()

    def start(self):
        ctx = multiprocessing.get_context("spawn")
        self.pool = cf.ProcessPoolExecutor(self.processes, mp_context=ctx, initializer=_init_worker,
                                           initargs=self.initargs)
        self.generation += 1

    def submit(self, *args):
        try:
            return self.pool.submit(_call, *args), self.generation
        except BrokenProcessPool:
            self.restart()
            return self.pool.submit(_call, *args), self.generation

    def restart(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.start()

    def close(self):
        self.pool.shutdown(wait=True)

    def terminate(self, grace: float = 10.0):
        procs = list((getattr(self.pool, "_processes", None) or {}).values())
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + grace
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
        self.pool.shutdown(wait=False, cancel_futures=True)


def run(jobs: list, network_factory: Callable[[int], Network], sink, *, workers: int | None = None,
        report: Callable[[object, str, str], None], image_of=lambda job: str(job.image),
        want_probabilities: bool = False, claim=None, release=None, device: str = "cpu",
        schedule: str = "auto") -> Progress:
    """Segment ``jobs`` through the pipeline; every job gets exactly one ``report(job, status, detail)``.

    Parameters
    ----------
    jobs : list
        What predict.py wants written; ``image_of(job)`` is the image's path.
    network_factory : callable
        ``network_factory(torch_threads) -> Network`` (called once).
    sink : callable
        Picklable ``sink(job, mask_uint8, fg_probability_or_None, info) -> status`` or ``(status, detail)``;
        runs in a worker. ``sink.cleanup(job)`` (optional) removes a killed write's temporary files.
    workers : int
        CPU allocation (:func:`cpu_allocation` by default), split by :func:`thread_plan`.
    claim, release : callable, optional
        ``claim(job)`` before a job is read: True goes on, ``(status, detail)`` is reported instead
        (``busy``: claimed by another run; ``up to date``: written meanwhile); ``release(job)`` after
        its last step.
    device, schedule : str
        The network's device and ``auto`` / ``pipeline`` / ``inline`` (:func:`choose_schedule`).
    """
    progress = Progress(images=len(jobs))
    if not jobs:
        return progress
    workers = cpu_allocation() if workers is None else workers
    progress.schedule = choose_schedule(schedule, device, workers)
    n_proc, n_threads = thread_plan(workers, len(jobs), progress.schedule)
    t0 = time.perf_counter()
    network = network_factory(n_threads)
    progress.model_load_seconds = time.perf_counter() - t0
    pool = None
    in_flight: dict = {}              # id(job) -> job
    claimed: set = set()
    terminated = []

    def done(job, status, detail=""):
        in_flight.pop(id(job), None)
        if release is not None and id(job) in claimed:
            claimed.discard(id(job))
            release(job)
        report(job, status, detail)

    def take(job) -> bool:
        """Claim ``job`` (when there is a claim hook); False when it is reported instead."""
        if claim is not None:
            got = claim(job)
            if got is not True:   # (status, detail): another run has it, or wrote it meanwhile
                report(job, *(got or ("busy", "another run is writing it")))
                return False
            claimed.add(id(job))
        in_flight[id(job)] = job
        return True

    def finish(job, out):
        status, detail = out if isinstance(out, tuple) else (out, "")
        done(job, status, detail)

    def network_info(fold_masks) -> dict:
        return {"fold_agreement_dice": mean_pairwise_dice(fold_masks or []),
                "folds": len(network.predictor.list_of_parameters)}

    def inline():
        """Each image's steps one after another in this process (the same functions the workers run)."""
        _load_state(str(network.spec.model_dir), network.configuration)
        for job in jobs:
            if not take(job):
                continue
            try:
                case = read_case(image_of(job))
                logits, fold_masks = network.logits(case.pop("data"))
                out = export_case(job, image_of(job), logits, case["props"], network_info(fold_masks), sink,
                                  want_probabilities)
            except Exception as exc:   # any step of this one image: its failure only
                done(job, "failed", failure_reason(exc))
                continue
            finish(job, out)

    def pipeline():
        nonlocal pool
        nice = WORKER_NICE if n_proc + n_threads > workers else 0
        pool = _Pool(n_proc, (str(network.spec.model_dir), network.configuration, nice))
        ahead = n_proc + 1
        todo = deque(jobs)
        reads: deque = deque()            # [job, future, generation] in job order
        exports: dict = {}                # future -> (job, generation)

        def fill_reads():
            while todo and len(reads) < ahead:
                job = todo.popleft()
                if take(job):
                    reads.append([job, *pool.submit(read_case, image_of(job))])

        def recover(generation):
            """A worker died: start the pool again (once per death) and submit the pending reads again."""
            if generation != pool.generation:
                return
            pool.restart()
            for entry in reads:
                entry[1:] = pool.submit(read_case, image_of(entry[0]))

        def collect(block: bool):
            if not exports:
                return
            finished, _ = cf.wait(list(exports), timeout=None if block else 0, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                job, generation = exports.pop(fut)
                try:
                    out = fut.result()
                except BrokenProcessPool as exc:
                    done(job, "failed", failure_reason(exc))
                    recover(generation)
                    continue
                except Exception as exc:   # any step of this one image: its failure only
                    done(job, "failed", failure_reason(exc))
                    continue
                finish(job, out)

        fill_reads()
        while reads:
            job, fut, generation = reads.popleft()
            try:
                case = fut.result()
            except BrokenProcessPool as exc:
                done(job, "failed", failure_reason(exc))
                recover(generation)
                fill_reads()
                continue
            except Exception as exc:
                done(job, "failed", failure_reason(exc))
                fill_reads()
                continue
            fill_reads()   # the next images are read while this one is on the network
            try:
                logits, fold_masks = network.logits(case.pop("data"))
            except Exception as exc:
                done(job, "failed", failure_reason(exc))
                continue
            info = network_info(fold_masks)
            del fold_masks
            while len(exports) >= ahead:
                collect(block=True)
            fut, generation = pool.submit(export_case, job, image_of(job), logits, case["props"], info, sink,
                                          want_probabilities)
            exports[fut] = (job, generation)
            del logits, case
            collect(block=False)
        while exports:
            collect(block=True)
        pool.close()

    def on_term(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt("SIGTERM")

    old_term = signal.signal(signal.SIGTERM, on_term)
    try:
        inline() if progress.schedule == "inline" else pipeline()
    except BaseException:
        if pool is not None:
            pool.terminate()
        cleanup = getattr(sink, "cleanup", None)
        if cleanup is not None:
            for job in list(in_flight.values()):
                cleanup(job)
        signal.signal(signal.SIGTERM, old_term)
        if terminated:   # end as SIGTERM would have ended us (status 128 + 15 to the parent)
            os.kill(os.getpid(), signal.SIGTERM)
        raise
    signal.signal(signal.SIGTERM, old_term)
    progress.forward_seconds = network.forward_seconds
    progress.wall_seconds = time.perf_counter() - t0
    write_stats(progress)
    return progress


def write_stats(progress: Progress) -> None:
    """With ``SACRUM_ENGINE_STATS=FILE`` (the benchmark), the run's timings and peak RSS as JSON in FILE."""
    import json
    import resource

    path = os.environ.get("SACRUM_ENGINE_STATS")
    if not path:
        return
    stats = {"images": progress.images, "wall_seconds": progress.wall_seconds,
             "forward_seconds": progress.forward_seconds, "model_load_seconds": progress.model_load_seconds,
             "schedule": progress.schedule,
             "peak_rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             "peak_rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    Path(path).write_text(json.dumps(stats))
