"""Stage 4 engine (sacrum_masks.engine): equality with the serial path, failure isolation, SIGTERM, uncertainty.

The model is a real nnU-Net model: planned by nnU-Net (fingerprint + default planner) for a tiny blob
dataset, with freshly initialised weights (``sacrum_masks.model_init``), two folds. Nothing about the
network is mocked; the full-disk write is a sink that raises ENOSPC (a real full disk cannot be made here
without mounting a file system), the network failure a factory whose second forward pass raises.
"""

from __future__ import annotations

import doctest
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sacrum_masks import engine, predict
from sacrum_masks.predict import NnunetModel, Settings, WriteMask, items_from_bids, run_predict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def test_doctests():
    result = doctest.testmod(engine)
    assert result.failed == 0 and result.attempted > 0


def test_thread_plan_never_exceeds_the_allocation():
    for n in range(engine.SMALL_ALLOCATION, 33):
        p, t = engine.thread_plan(n)
        assert p >= 1 and t >= 1 and p + t <= n
        assert engine.choose_schedule("auto", "cpu", n) == "pipeline"
    for n in range(1, engine.SMALL_ALLOCATION):
        assert engine.choose_schedule("auto", "cpu", n) == "inline"
        assert engine.thread_plan(n, schedule="inline") == (0, n)   # no process beside the network
        assert engine.thread_plan(n) == (1, n)   # pipelined anyway (a GPU): the worker runs niced
        assert engine.choose_schedule("auto", "cuda:0", n) == "pipeline"
    with pytest.raises(ValueError):
        engine.choose_schedule("fastest", "cpu", 2)
    assert engine.cpu_allocation({"SLURM_CPUS_PER_TASK": "3"}) == 3
    assert engine.cpu_allocation({}) == len(os.sched_getaffinity(0))


# ------------------------------------------------------------------------------------ a real small model

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from sacrum_masks.model_init import plan_dataset, write_initialised_model
    from test_train import write_blob_dataset

    work = tmp_path_factory.mktemp("tiny_model")
    raw = write_blob_dataset(work / "raw", 911, n_train=3, n_test=0, shape=(40, 48, 32))
    plans = plan_dataset(raw, work, 911)
    model = work / "results" / "Dataset911_Blob" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    return write_initialised_model(model, plans, raw / "dataset.json", folds=(0, 1), seed=3)


def blob_bids(root: Path, n: int = 4, seed: int = 1) -> Path:
    """A BIDS dataset of ``n`` blob images in several orientations (the engine reorients to RPI)."""
    from nibabel.orientations import axcodes2ornt, ornt_transform

    rng = np.random.default_rng(seed)
    ds = root / "ds"
    shape = (40, 48, 32)
    grid = np.indices(shape).astype(np.float32)
    for i in range(n):
        centre = [rng.uniform(0.4, 0.6) * s for s in shape]
        radii = [rng.uniform(0.15, 0.22) * s for s in shape]
        label = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1
        data = (100 + 80 * label + rng.normal(0, 15, shape)).astype(np.float32)
        img = nib.Nifti1Image(data, np.diag([1.5, 1.5, 1.5, 1.0]))
        codes = [("R", "A", "S"), ("L", "P", "S"), ("P", "I", "R"), ("L", "A", "S")][i % 4]
        img = img.as_reoriented(ornt_transform(axcodes2ornt(("R", "A", "S")), axcodes2ornt(codes)))
        path = ds / f"sub-{i + 1:02d}" / "anat" / f"sub-{i + 1:02d}_T2w.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, path)
    return ds


def masks_of(ds: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(ds).as_posix(): np.asanyarray(nib.load(p).dataobj)
            for p in sorted((ds / "derivatives" / "labels").rglob("*_label-sacrum_seg.nii.gz"))}


def sidecars_of(ds: Path) -> dict[str, dict]:
    return {p.relative_to(ds).as_posix(): json.loads(p.read_text())
            for p in sorted((ds / "derivatives" / "labels").rglob("*_label-sacrum_seg.json"))}


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if ".tmp" in p.name]


@pytest.mark.slow
@pytest.mark.parametrize("fold,schedule", [("0", "pipeline"), ("0 1", "pipeline"), ("0 1", "inline")])
def test_engine_masks_equal_the_serial_path_voxel_for_voxel(tiny_model, tmp_path, capsys, fold, schedule):
    a, b = blob_bids(tmp_path / "a"), blob_bids(tmp_path / "b")
    settings = Settings(tiny_model, fold, "final", workers=2, save_probabilities=True, schedule=schedule)
    assert run_predict(items_from_bids(a), settings) == 0
    serial = Settings(tiny_model, fold, "final")
    assert run_predict(items_from_bids(b), serial,
                       model_factory=lambda s: NnunetModel(s.model_dir, s.fold, s.checkpoint)) == 0
    ma, mb = masks_of(a), masks_of(b)
    assert len(ma) == 4 and ma.keys() == mb.keys()
    for key in ma:
        assert np.array_equal(ma[key], mb[key]), key
    assert any(m.any() for m in ma.values()), "a model that segments nothing tests little"
    # uncertainty in the sidecar; the probseg beside the mask, on the image's grid, in [0, 1]
    for key, side in sidecars_of(a).items():
        mask = ma[key.replace(".json", ".nii.gz")]
        if mask.any():
            assert 0.0 <= side["BoundaryEntropy"] <= 1.0
        assert ("FoldAgreementDice" in side) == (fold == "0 1")
        prob = nib.load(a / key.replace("_seg.json", "_probseg.nii.gz"))
        image = nib.load(a / key.replace("derivatives/labels/", "").replace("_label-sacrum_seg.json", ".nii.gz"))
        assert prob.shape == image.shape and np.allclose(prob.affine, image.affine)
        p = np.asanyarray(prob.dataobj)
        assert p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1
        assert not (mask.astype(bool) & (p < 0.5 - 1e-6)).any()   # the kept component is where p >= 0.5
    if fold == "0 1":
        assert all(0.0 <= s["FoldAgreementDice"] <= 1.0 for s in sidecars_of(a).values())
    assert not temporaries(a)


class FailingForward:
    """A network factory whose second forward pass raises (an nnU-Net/torch error for one image)."""

    def __init__(self, settings):
        self.inner = predict.engine_network_factory(settings)

    def __call__(self, threads):
        net = self.inner(threads)
        real, calls = net.logits, []

        def logits(data):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real(data)

        net.logits = logits
        return net


class FullDiskFor(WriteMask):
    """The real writer, except that the mask write of sub-03 hits a full disk (after the pending sidecar)."""

    def write(self, job, mask, img, n_removed, extra, outputs):
        if "sub-03" in job.mask.name:
            from sacrum_masks import nifti

            real = nifti.save_nifti_atomic

            def full(img, path):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            import sacrum_masks.derivatives as derivatives
            derivatives.save_nifti_atomic = full
            try:
                return super().write(job, mask, img, n_removed, extra, outputs)
            finally:
                derivatives.save_nifti_atomic = real
        return super().write(job, mask, img, n_removed, extra, outputs)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["pipeline", "inline"])
def test_one_bad_image_per_step_fails_alone(tiny_model, tmp_path, capsys, schedule):
    ds = blob_bids(tmp_path, n=5)
    (ds / "sub-05" / "anat" / "sub-05_T2w.nii.gz").write_bytes(b"\x1f\x8b not really a NIfTI")   # read fails
    settings = Settings(tiny_model, "0", "final", workers=2, schedule=schedule)
    code = run_predict(items_from_bids(ds), settings, network_factory=FailingForward(settings),
                       sink_factory=FullDiskFor)
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 1
    failed = sorted(line for line in text.splitlines() if line.startswith("predict: failed"))
    assert len(failed) == 3, text
    assert any("sub-05" in f and "cannot read NIfTI" in f for f in failed)
    assert any("sub-02" in f and "RuntimeError: CUDA error" in f for f in failed)
    assert any("sub-03" in f and "No space left on device" in f for f in failed)
    assert out.out.strip().splitlines()[-1] == "predict: 2 written, 0 up to date, 0 kept, 3 failed"
    written = sorted(Path(k).name for k in masks_of(ds))
    assert written == ["sub-01_T2w_label-sacrum_seg.nii.gz", "sub-04_T2w_label-sacrum_seg.nii.gz"]
    assert sorted(Path(k).name for k in sidecars_of(ds)) == [w.replace(".nii.gz", ".json") for w in written]
    assert not temporaries(ds)


def _children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out |= {int(t) for t in text}
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["pipeline", "inline"])
def test_sigterm_mid_run_leaves_no_worker_and_no_temporary_file(tiny_model, tmp_path, schedule):
    ds = blob_bids(tmp_path, n=8)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "py"))
    cmd = [str(Path(sys.executable).parent / "sacrum-masks"), "predict", "--bids", str(ds), "--model", str(tiny_model),
           "--checkpoint", "final", "--device", "cpu", "--workers", "2", "--schedule", schedule]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers: set[int] = set()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            workers |= _children(proc.pid)
            if line.startswith("predict: written"):
                break
        workers |= _children(proc.pid)
        assert bool(workers) == (schedule == "pipeline"), "".join(lines)   # in line: no worker process
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM, "".join(lines) + rest
    deadline = time.time() + 10
    while any(_alive(w) for w in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not [w for w in workers if _alive(w)]
    assert not temporaries(ds)
    assert 1 <= len(masks_of(ds)) < 8
    # every mask is whole, with its sidecar: the next run does only the rest
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(masks_of(ds)) == 8


def test_serial_path_failures_are_isolated_too(tmp_path, capsys):
    """The serial path (stand-in network) reports any exception of one image and goes on."""
    from test_predict import fake_model_dir, small_dataset, threshold_model

    ds = small_dataset(tmp_path)
    calls = []

    def flaky(array, spacing):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("the stand-in network failed")
        return threshold_model(array, spacing)

    model = type("M", (), {"predict": staticmethod(flaky)})()
    code = run_predict(items_from_bids(ds), Settings(fake_model_dir(tmp_path)), model_factory=lambda s: model)
    out = capsys.readouterr()
    assert code == 1 and out.out.strip().splitlines()[-1] == "predict: 2 written, 0 up to date, 0 kept, 1 failed"
    assert "ValueError: the stand-in network failed" in out.err


def test_boundary_entropy_and_agreement_on_tiny_grids():
    m = np.zeros((6, 6, 6), bool)
    m[2:4, 2:4, 2:4] = True
    p = np.where(m, 0.9, 0.1)
    h = engine.binary_entropy_bits(np.array([0.9]))[0]
    assert engine.boundary_entropy(m, p) == pytest.approx(h, abs=1e-6)
    assert engine.boundary_entropy(np.zeros_like(m), p) is None
    other = m.copy()
    other[2, 2, 2] = False
    assert engine.mean_pairwise_dice([m, m, other]) == pytest.approx((1 + 2 * (2 * 7 / 15)) / 3, abs=1e-6)


@pytest.mark.slow
def test_plain_trainers_load_without_the_trainer_search(tiny_model):
    """nnUNetTrainer's network is built as nnUNetTrainer builds it, without importing trainer modules."""
    code = (
        "import sys; from pathlib import Path; from sacrum_masks import engine\n"
        f"net = engine.Network(engine.ModelSpec(Path({str(tiny_model)!r}), (0,), 'final'), 1)\n"
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        "p = net.predictor\n"
        "ref = nnUNetTrainer.build_network_architecture(p.plans_manager, p.configuration_manager, 1, 2, False)\n"
        "ref.load_state_dict(p.network.state_dict())\n"   # strict: the same modules and shapes
        "print(type(p.network).__name__, type(ref).__name__)\n")
    probe = code.replace("from nnunetv2.training", "print('seaborn' in sys.modules)\nfrom nnunetv2.training", 1)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "py")))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == "False"                       # no trainer module (and its seaborn) imported
    assert lines[1] == lines[2] == "PlainConvUNet"
