"""Benchmark of stage 4 on the CPU: ``bin/generate_sacrum.sh`` (one process, model loaded once) against
the original procedure's way, measured in the same run on the same images with the same model.

The original ``generate_sacrum.sh`` starts, for every image, three Python processes:
``run_nnunet_inference_single_subject.py`` (copy to a temporary folder, reorient to RPI, create an
``nnUNetPredictor``, load the model, ``predict_from_files`` with 4 + 4 worker processes, reorient back),
``largest_component_filewise.py`` (``get_fdata()`` float64, ``scipy.ndimage.label``) and
``create_json_sidecar.py``. This script reproduces the three (same nnU-Net calls and settings: tile step
0.5, Gaussian weighting, no mirroring) and times them against one ``generate_sacrum.sh`` run.

Needs the demo (``make demo``): its test images and its small model; skips, saying so, without them.

    python bench/bench_predict.py [--demo-data DIR] [--images 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_REL = "nnUNet/results/Dataset300_SacrumDataset/nnUNetTrainer_SacrumCPU__nnUNetPlans__3d_fullres_small"


# ------------------------------------------------------------------ the original's three per-image steps

def original_infer(image: str, out: str, model: str, fold: str) -> None:
    """As run_nnunet_inference_single_subject.py: a fresh process, model loaded for this one image."""
    import nibabel as nib
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    tmp = tempfile.mkdtemp(prefix="sacrum_orig_")
    try:
        tmp_img = os.path.join(tmp, os.path.basename(image))
        shutil.copyfile(image, tmp_img)
        img = nib.load(tmp_img)
        orig = nib.orientations.io_orientation(img.affine)
        rpi = nib.orientations.axcodes2ornt(("L", "A", "S"))
        nib.save(img.as_reoriented(nib.orientations.ornt_transform(orig, rpi)), tmp_img)
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=False, device=torch.device("cpu"),
                                    verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(model, use_folds=[int(fold)],
                                                       checkpoint_name="checkpoint_final.pth")
        out_dir = os.path.join(tmp, "nnUNet_prediction")
        os.mkdir(out_dir)
        predictor.predict_from_files([[tmp_img]], out_dir, save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=4, num_processes_segmentation_export=4,
                                     folder_with_segs_from_prev_stage=None, num_parts=1, part_id=0)
        pred_file = [f for f in os.listdir(out_dir) if f.endswith(".nii.gz")][0]
        pred = nib.load(os.path.join(out_dir, pred_file))
        back = nib.orientations.ornt_transform(rpi, orig)
        nib.save(pred.as_reoriented(back), out)
    finally:
        shutil.rmtree(tmp)


def original_largest(seg_in: str, seg_out: str) -> None:
    """As largest_component_filewise.py: float64 data, scipy.ndimage.label with a 3x3x3 structure."""
    import nibabel as nib
    import numpy as np
    from scipy.ndimage import label

    seg = nib.load(seg_in)
    seg_data_src = seg.get_fdata().astype(np.uint8)
    seg_data = np.zeros_like(seg_data_src)
    for value in [v for v in np.unique(seg_data_src) if v != 0]:
        labeled, _ = label(seg_data_src == value, np.ones((3, 3, 3)))
        sizes = np.bincount(labeled.ravel())[1:]
        seg_data[labeled == sizes.argmax() + 1] = value
    out = nib.Nifti1Image(seg_data, seg.affine, seg.header)
    out.set_data_dtype(np.uint8)
    nib.save(out, seg_out)


def original_sidecar(path_json: str) -> None:
    """As create_json_sidecar.py: a small JSON file written by its own process."""
    import datetime

    with open(path_json, "w") as fh:
        json.dump({"GeneratedBy": [{"Name": "nnUNet3D", "Date": datetime.datetime.now().isoformat()}]}, fh, indent=4)


# ------------------------------------------------------------------------------------------------ bench

def pick_images(bids: Path, count: int) -> list[Path]:
    images = []
    for name in ("whole-spine", "spider-challenge-2023"):
        images += sorted(p for p in (bids / name).glob("sub-*/**/anat/*.nii.gz") if "_CT" not in p.name)
    return images[:count]


def copy_images(images: list[Path], bids: Path, dest: Path) -> list[str]:
    entries = []
    for image in images:
        rel = image.relative_to(bids)
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(image, dest / rel)
        entries.append(rel.as_posix())
    return entries


def run_original(entries: list[str], root: Path, model: Path) -> float:
    me = [sys.executable, str(Path(__file__).resolve())]
    env = dict(os.environ)
    env.setdefault("nnUNet_extTrainer", str(ROOT / "py" / "sacrum_masks" / "nnunet_trainers"))
    start = time.perf_counter()
    for entry in entries:
        image = root / entry
        dataset = root / entry.split("/")[0]
        out = dataset / "derivatives" / "labels" / image.relative_to(dataset).parent / \
            image.name.replace(".nii.gz", "_label-sacrum_seg.nii.gz")
        out.parent.mkdir(parents=True, exist_ok=True)
        for step in (["--original-infer", str(image), str(out), str(model), "0"],
                     ["--original-largest", str(out), str(out)],
                     ["--original-sidecar", str(out).replace(".nii.gz", ".json")]):
            subprocess.run(me + step, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def run_ours(entries: list[str], root: Path, model: Path, data: Path) -> tuple[float, str]:
    cfg = root / "test.json"
    cfg.write_text(json.dumps({"TYPE": "IMAGE", "CONTRASTS": "t1_t2", "DATASETS_PATH": str(root),
                               "TRAINING": [], "VALIDATION": [], "TESTING": entries}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env["SACRUM_DATA"] = str(data)
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "bin" / "generate_sacrum.sh"), "--config", str(cfg), "--model",
                           str(model), "--fold", "0", "--checkpoint", "final", "--gpu", "cpu"],
                          env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench_predict: generate_sacrum.sh failed:\n{proc.stdout}\n{proc.stderr}")
    return elapsed, proc.stdout.strip().splitlines()[-1]


def agreement(entries: list[str], a: Path, b: Path) -> float:
    """Mean Dice between the two runs' masks (same model: should be ~1)."""
    import nibabel as nib
    import numpy as np

    from sacrum_masks.metrics import dice

    scores = []
    for entry in entries:
        dataset, rel = entry.split("/", 1)
        mask_rel = Path(dataset) / "derivatives" / "labels" / rel.replace(".nii.gz", "_label-sacrum_seg.nii.gz")
        scores.append(dice(np.asanyarray(nib.load(a / mask_rel).dataobj) > 0,
                           np.asanyarray(nib.load(b / mask_rel).dataobj) > 0))
    return float(np.mean(scores))


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--original-infer":
        original_infer(*argv[1:5])
        return 0
    if argv and argv[0] == "--original-largest":
        original_largest(*argv[1:3])
        return 0
    if argv and argv[0] == "--original-sidecar":
        original_sidecar(argv[1])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-data", type=Path, default=Path(os.environ.get("BENCH_DEMO_DATA", ROOT / "data" / "demo")),
                        help="SACRUM_DATA of a finished `make demo` (default data/demo, env BENCH_DEMO_DATA)")
    parser.add_argument("--images", type=int, default=20)
    args = parser.parse_args(argv)
    data = args.demo_data.resolve()
    model = data / MODEL_REL
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        print(f"bench_predict: skipped, no demo model in {model} (run `make demo` first)")
        return 0
    images = pick_images(data / "bids", args.images)
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        ours_root, orig_root = Path(tmp) / "ours", Path(tmp) / "orig"
        entries = copy_images(images, data / "bids", ours_root)
        copy_images(images, data / "bids", orig_root)
        print(f"bench_predict: {len(entries)} demo test images, small demo model, CPU "
              f"({os.cpu_count()} cores), no mirroring, tile step 0.5")
        t_ours, summary = run_ours(entries, ours_root, model, data)
        t_orig = run_original(entries, orig_root, model)
        t_again, summary_again = run_ours(entries, ours_root, model, data)
        print(f"  original way (3 processes and one model load per image): {t_orig:.1f} s "
              f"({t_orig / len(entries):.2f} s per image)")
        print(f"  generate_sacrum.sh (one process, model loaded once):      {t_ours:.1f} s "
              f"({t_ours / len(entries):.2f} s per image)  [{summary}]")
        print(f"  ratio: {t_orig / t_ours:.1f}x (goal >= 5x); masks agree with the original way's: "
              f"mean Dice {agreement(entries, ours_root, orig_root):.4f}")
        print(f"  rerun with everything up to date (cron): {t_again:.1f} s  [{summary_again}] -> "
              f"{t_orig / t_again:.0f}x less than redoing the original way")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
