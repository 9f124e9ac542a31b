"""Benchmark of the stage 4 engine (sacrum_masks.engine) on the CPU, every ratio against a baseline
measured in the same run on the same files with the same settings (tile step 0.5, no mirroring, fold 0).

Real size: ``--images`` SPIDER-like sagittal images (15 x 512 x 512 voxels at 3.3 x 0.6 x 0.6 mm, made
by sacrum_masks.synth, stored in SCT RPI so that nnU-Net reads the arrays our engine gives the network),
planned by nnU-Net's default planner (fingerprint + ``nnUNetv2_plan_experiment``: its 3d_fullres network
for such data), freshly initialised weights (sacrum_masks.model_init):
  (a) ``sacrum-masks predict`` (files in, files out, ``--schedule auto``) against
      ``nnUNetv2_predict_from_modelfolder`` (its default -npp 3 -nps 3; -f 0 --disable_tta -step_size 0.5
      -device cpu; glibc's malloc defaults) on the same files, and how many masks equal nnU-Net's output
      voxel for voxel once its largest component is kept;
  (b) our run's wall time against the sum of its forward passes (``SACRUM_ENGINE_STATS``);
  (c) ours against the serial path (``predict --serial``: predict_single_npy_array per image); with
      ``--rows pipeline`` also the pipeline forced on this allocation;
  allocator (``--rows allocator``): ours with ``SACRUM_MALLOC=system`` (sacrum_masks.memory off);
  preset (``--rows fast``): ``--preset fast`` against the reference settings;
  peak RSS for ``--rss-images`` (10 and 100: the same files under more names), pipelined, with the same
  plans' 3d_fullres_small network (the pipeline's buffers are the point, not the network's speed);
  ``--part rss-demo`` does the same with the demo model.
CPU settings (``--part cpu``) on the demo model (``make demo``, or BENCH_DEMO_DATA): time per image and
mean Dice against the reference settings for tile step 0.75 / 1.0, bf16 autocast, torch.compile, torch
thread counts.

    python bench/bench_engine.py [--part real|cpu|all] [--images 6] [--workers 2]
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

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEMO_MODEL = "nnUNet/results/Dataset300_SacrumDataset/nnUNetTrainer_SacrumCPU__nnUNetPlans__3d_fullres_small"


def env_for(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "py") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("nnUNet_extTrainer", str(ROOT / "py" / "sacrum_masks" / "nnunet_trainers"))
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------ real size

def spider_like(out: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    """``n`` SPIDER-sized sagittal T2w images: a BIDS dataset and an nnU-Net raw dataset of the same files."""
    import nibabel as nib

    from sacrum_masks.synth import Anatomy, grid_affine, render_mri, sacrum_truth

    rng = np.random.default_rng(seed)
    bids, raw = out / "bids" / "spider", out / "raw" / "Dataset950_Spider"
    for sub in ("imagesTr", "labelsTr"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        anatomy = Anatomy.draw(rng)
        # SCT "RPI" (nibabel L, A, S): the orientation stage 4 gives the network, so nnUNetv2_predict on
        # the file sees the same arrays as our engine
        affine, shape = grid_affine("LAS", (3.3, 0.6, 0.6), (15, 512, 512), anatomy.to_world((0.0, -10.0, -10.0)))
        data, struct = render_mri(anatomy, affine, shape, "T2w", rng)
        path = bids / f"sub-{i + 1:03d}" / "anat" / f"sub-{i + 1:03d}_T2w.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), path)
        os.link(path, raw / "imagesTr" / f"spider_{i:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(sacrum_truth(struct), affine), raw / "labelsTr" / f"spider_{i:03d}.nii.gz")
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "sacrum": 1},
                                                  "numTraining": n, "file_ending": ".nii.gz"}))
    return bids, raw


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_engine: {' '.join(cmd[:3])} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def ours(ds: Path, model: Path, workers: int, work: Path, *extra: str, extra_env=None) -> tuple[float, dict]:
    shutil.rmtree(ds / "derivatives", ignore_errors=True)
    stats = work / f"stats-{time.monotonic_ns()}.json"
    wall = timed([str(BIN / "sacrum-masks"), "predict", "--bids", str(ds), "--model", str(model), "--checkpoint",
                  "final", "--device", "cpu", "--workers", str(workers), *extra],
                 env_for(SACRUM_ENGINE_STATS=str(stats), **(extra_env or {})))
    return wall, json.loads(stats.read_text()) if stats.exists() else {}


def masks_by_image(ds: Path) -> dict[str, np.ndarray]:
    """``{"sub-001": mask}`` of the stage 4 masks written in ``ds``."""
    import nibabel as nib

    return {p.name.split("_")[0]: np.asanyarray(nib.load(p).dataobj) != 0
            for p in sorted((ds / "derivatives" / "labels").rglob("*_label-sacrum_seg.nii.gz"))}


def agreement_with_nnunet(ours_masks: dict, nnunet_out: Path) -> tuple[int, int]:
    """How many of our masks equal nnUNetv2_predict's (spider_<i>.nii.gz = sub-<i+1>) after its largest component."""
    import nibabel as nib

    from sacrum_masks.components import largest_component

    same = 0
    for key, mask in ours_masks.items():
        theirs = np.asanyarray(nib.load(nnunet_out / f"spider_{int(key[4:]) - 1:03d}.nii.gz").dataobj) != 0
        same += bool(np.array_equal(largest_component(theirs, 26)[0] != 0, mask))
    return same, len(ours_masks)


def renamed_copies(src: Path, dest: Path, n: int) -> Path:
    """A BIDS dataset of ``n`` images: hard links to the files of ``src`` under new subject names."""
    files = sorted(src.glob("sub-*/anat/*_T2w.nii.gz"))
    for i in range(n):
        path = dest / f"sub-{i + 1:03d}" / "anat" / f"sub-{i + 1:03d}_T2w.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(files[i % len(files)], path)
    return dest


def part_real(args, work: Path) -> None:
    from sacrum_masks.metrics import dice
    from sacrum_masks.model_init import plan_dataset, write_initialised_model
    from sacrum_masks.plans import add_small_plans

    t = time.perf_counter()
    bids, raw = spider_like(work, args.images)
    plans = plan_dataset(raw, work, 950)
    cfg = json.loads(plans.read_text())["configurations"]["3d_fullres"]
    model = write_initialised_model(work / "results" / raw.name / "nnUNetTrainer__nnUNetPlans__3d_fullres",
                                    plans, raw / "dataset.json")
    small_plans = work / "plans_small.json"
    shutil.copyfile(plans, small_plans)
    add_small_plans(small_plans)
    small = write_initialised_model(work / "results" / raw.name / "nnUNetTrainer__nnUNetPlans__3d_fullres_small",
                                    small_plans, raw / "dataset.json", configuration="3d_fullres_small")
    if args.network == "small":
        cfg = json.loads(small_plans.read_text())["configurations"]["3d_fullres_small"]
        cfg = {**json.loads(plans.read_text())["configurations"]["3d_fullres"], **cfg}
        model = small
    print(f"bench_engine real size: {args.images} images 15x512x512 at 3.3x0.6x0.6 mm; nnU-Net 3d_fullres plans: "
          f"patch {cfg['patch_size']}, spacing {cfg['spacing']}, features "
          f"{cfg['architecture']['arch_kwargs']['features_per_stage']} ({args.network} network); fresh weights; {args.workers} workers, "
          f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at start); made in "
          f"{time.perf_counter() - t:.0f} s", flush=True)

    # (a) nnUNetv2_predict on the same files, its defaults (glibc's malloc defaults too), same settings
    out = work / "nnunet_out"
    plain = {k: v for k, v in env_for().items() if k not in ("GLIBC_TUNABLES", "SACRUM_MALLOC")}
    t_nnunet = timed([str(BIN / "nnUNetv2_predict_from_modelfolder"), "-i", str(raw / "imagesTr"), "-o", str(out),
                      "-m", str(model), "-f", "0", "-chk", "checkpoint_final.pth", "--disable_tta", "-step_size", "0.5",
                      "-device", "cpu"], plain)
    t_ours, stats = ours(bids, model, args.workers, work)
    reference = masks_by_image(bids)
    n = args.images
    print(f"  (a) nnUNetv2_predict: {t_nnunet:.1f} s ({t_nnunet / n:.1f} s/image); ours ({stats.get('schedule')}): "
          f"{t_ours:.1f} s ({t_ours / n:.1f} s/image): ratio {t_nnunet / t_ours:.2f}x (goal >= 1.25x on 2 cores)",
          flush=True)
    same, total = agreement_with_nnunet(reference, out)
    print(f"      masks voxel for voxel equal to nnUNetv2_predict's (its output, largest component kept): "
          f"{same} of {total} images", flush=True)
    fwd = stats.get("forward_seconds", float("nan"))
    eng = stats.get("wall_seconds", float("nan"))
    print(f"  (b) sum of forward passes {fwd:.1f} s; engine wall {eng:.1f} s (model load "
          f"{stats.get('model_load_seconds', 0):.1f} s): overhead {100 * (eng / fwd - 1):.1f}% (goal <= 15%); "
          f"whole process {t_ours:.1f} s: {100 * (t_ours / fwd - 1):.1f}%", flush=True)
    shutil.rmtree(bids / "derivatives", ignore_errors=True)
    t_serial = timed([str(BIN / "sacrum-masks"), "predict", "--bids", str(bids), "--model", str(model), "--checkpoint",
                      "final", "--device", "cpu", "--serial"], env_for())
    print(f"  (c) serial path (predict_single_npy_array per image) {t_serial:.1f} s; ours ({stats.get('schedule')}) "
          f"{t_ours:.1f} s: ratio {t_serial / t_ours:.2f}x", flush=True)
    if "pipeline" in args.rows:
        t_pipe, st_pipe = ours(bids, model, args.workers, work, "--schedule", "pipeline")
        print(f"      pipeline forced ({args.workers} CPUs): {t_pipe:.1f} s, {t_serial / t_pipe:.2f}x the serial path; "
              f"its forward passes {st_pipe.get('forward_seconds', 0):.1f} s against {fwd:.1f} s in line", flush=True)
    if "allocator" in args.rows:
        t_sys, st_sys = ours(bids, model, args.workers, work, extra_env={"SACRUM_MALLOC": "system"})
        print(f"  allocator: ours with glibc's malloc defaults (SACRUM_MALLOC=system) {t_sys:.1f} s, forward passes "
              f"{st_sys.get('forward_seconds', 0):.1f} s; kept memory (default) {t_ours:.1f} s, {fwd:.1f} s: "
              f"{t_sys / t_ours:.2f}x", flush=True)
    if "fast" in args.rows:
        t_fast, st_fast = ours(bids, model, args.workers, work, "--preset", "fast")
        fast = masks_by_image(bids)
        d = np.mean([dice(reference[k], fast[k]) for k in reference]) if reference else float("nan")
        print(f"  preset fast: {t_fast:.1f} s ({t_fast / n:.1f} s/image): {t_nnunet / t_fast:.2f}x nnUNetv2_predict, "
              f"{t_ours / t_fast:.2f}x ours at the reference settings; agreement Dice with ours {d:.4f} "
              f"(fresh weights: a random network's masks, the demo rows are the ones that count)", flush=True)

    # peak RSS: the same plans' small network, 10 against 100 images
    rows = []
    for count in args.rss_images:
        ds = renamed_copies(bids, work / f"rss{count}" / "ds", count)
        wall, st = ours(ds, small, args.workers, work, "--tile-step", "1.0", "--schedule", "pipeline")
        rows.append((count, wall, st))
        print(f"  RSS {count} images: {wall:.1f} s, peak RSS main {st.get('peak_rss_main_mb', 0):.0f} MB, "
              f"largest worker {st.get('peak_rss_worker_mb', 0):.0f} MB", flush=True)
    if len(rows) == 2:
        a, b = rows[0][2].get("peak_rss_main_mb", 1), rows[1][2].get("peak_rss_main_mb", 1)
        print(f"  peak RSS {rows[1][0]} / {rows[0][0]} images: {b / a:.2f}x (goal <= 1.5x)", flush=True)


# ------------------------------------------------------------------------------------------ CPU settings

def part_cpu(args, work: Path) -> None:
    import nibabel as nib

    from sacrum_masks import engine
    from sacrum_masks.metrics import dice
    from sacrum_masks.predict import Settings, engine_network_factory, items_from_bids, run_predict

    data = args.demo_data
    model = data / DEMO_MODEL
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        print(f"bench_engine cpu settings: skipped, no demo model in {model} (run `make demo` first)")
        return
    os.environ.setdefault("nnUNet_extTrainer", str(ROOT / "py" / "sacrum_masks" / "nnunet_trainers"))
    images = sorted(p for name in ("whole-spine", "spider-challenge-2023")
                    for p in (data / "bids" / name).glob("sub-*/**/anat/*.nii.gz") if "_CT" not in p.name)
    images = images[:args.cpu_images]
    print(f"bench_engine CPU settings: {len(images)} demo test images, demo model (3d_fullres_small), "
          f"reference tile step 0.5 without mirroring", flush=True)

    def run(name, workers=2, **kw):
        threads = kw.get("threads")
        ds = work / "cpu" / name / "ds"
        shutil.rmtree(ds.parent, ignore_errors=True)
        for img in images:
            dst = ds / Path(*img.relative_to(data / "bids").parts[1:])
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(img, dst)
        settings = Settings(model, "0", "final", workers=workers, **{k: v for k, v in kw.items() if k not in ("compile", "threads")})
        factory = engine_network_factory(settings)
        if kw.get("compile") or threads:
            spec = engine.ModelSpec(model, (0,), "final", "cpu", settings.tile_step, False, settings.bf16,
                                    kw.get("compile", False))
            factory = lambda t: engine.Network(spec, threads or t)   # noqa: E731
        start = time.perf_counter()
        with open(os.devnull, "w") as quiet:
            code = run_predict(items_from_bids(ds), settings, network_factory=factory, stream=quiet)
        wall = time.perf_counter() - start
        masks = {p.relative_to(ds).as_posix(): np.asanyarray(nib.load(p).dataobj) > 0
                 for p in (ds / "derivatives").rglob("*_seg.nii.gz")}
        return wall, masks, code

    run("warmup")   # first run of the process: imports, caches (not counted)
    ref_wall, ref, _ = run("reference")
    print(f"  reference: {ref_wall / len(images):.2f} s/image", flush=True)
    rows = [("tile step 0.75", dict(tile_step=0.75)), ("tile step 1.0", dict(tile_step=1.0)),
            ("bf16 autocast", dict(bf16=True)), ("torch.compile", dict(compile=True)),
            ("1 torch thread", dict(threads=1)), ("2 torch threads", dict(threads=2)),
            ("tile step 1.0 + bf16", dict(tile_step=1.0, bf16=True)), ("reference again", dict())]
    for name, kw in rows:
        try:
            wall, masks, code = run(name.replace(" ", "_").replace(".", ""), **kw)
        except Exception as exc:   # e.g. torch.compile without a C++ compiler
            print(f"  {name}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", flush=True)
            continue
        common = sorted(set(ref) & set(masks))
        d = float(np.mean([dice(ref[k], masks[k]) for k in common])) if common else float("nan")
        print(f"  {name}: {wall / len(images):.2f} s/image, {ref_wall / wall:.2f}x the reference, agreement Dice "
              f"{d:.4f} ({len(common)} masks, exit {code})", flush=True)


def part_rss_demo(args, work: Path) -> None:
    """Peak RSS for 10 and 100 images with the demo model (demo images under more names): bounded buffers."""
    model = args.demo_data / DEMO_MODEL
    if not (model / "fold_0" / "checkpoint_final.pth").is_file():
        print(f"bench_engine RSS (demo): skipped, no demo model in {model}")
        return
    src = work / "rss_demo_src"
    images = sorted(p for p in (args.demo_data / "bids" / "spider-challenge-2023").glob("sub-*/**/anat/*.nii.gz")
                    if "_CT" not in p.name)
    for i, img in enumerate(images):
        dst = src / f"sub-{i + 1:03d}" / "anat" / f"sub-{i + 1:03d}_T2w.nii.gz"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(img, dst)
    rows = []
    for count in args.rss_images:
        ds = renamed_copies(src, work / f"rss_demo{count}" / "ds", count)
        wall, st = ours(ds, model, args.workers, work, "--schedule", "pipeline")
        rows.append((count, st))
        print(f"  RSS (demo model) {count} images: {wall:.1f} s, peak RSS main {st.get('peak_rss_main_mb', 0):.0f} MB, "
              f"largest worker {st.get('peak_rss_worker_mb', 0):.0f} MB", flush=True)
    if len(rows) == 2:
        a, b = rows[0][1].get("peak_rss_main_mb", 1), rows[1][1].get("peak_rss_main_mb", 1)
        print(f"  peak RSS (demo model) {rows[1][0]} / {rows[0][0]} images: {b / a:.2f}x (goal <= 1.5x)", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["real", "cpu", "rss-demo", "all"], default="all")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rss-images", type=int, nargs="*", default=[10, 100])
    parser.add_argument("--network", choices=["default", "small"], default="default",
                        help="rows (a)-(c) with nnU-Net's 3d_fullres network (default) or its 8-64 feature copy")
    parser.add_argument("--cpu-images", type=int, default=8)
    parser.add_argument("--rows", nargs="*", default=["pipeline", "allocator", "fast"],
                        choices=["pipeline", "allocator", "fast"], help="optional real-size rows")
    parser.add_argument("--demo-data", type=Path, default=Path(os.environ.get("BENCH_DEMO_DATA", ROOT / "data" / "demo")))
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_engine_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.part in ("cpu", "all"):
            part_cpu(args, work)
        if args.part in ("real", "all"):
            part_real(args, work)
        if args.part == "rss-demo":
            part_rss_demo(args, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
