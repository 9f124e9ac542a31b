"""An nnU-Net model folder with freshly initialised weights, planned by nnU-Net for a raw dataset.

For the engine's tests and benchmark: the network is exactly what nnU-Net plans for the data
(``nnUNetv2_extract_fingerprint`` + ``nnUNetv2_plan_experiment``, default planner, e.g. 3d_fullres for
SPIDER-sized images), its weights are those of ``nnUNetTrainer.build_network_architecture`` (He
initialisation, seeded), written as nnU-Net writes a checkpoint (``network_weights``, ``trainer_name``,
``init_args.configuration``, ``inference_allowed_mirroring_axes``). Accuracy is not the point: speed and
the code path are.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


def plan_dataset(raw_dataset: Path, work: Path, dnum: int) -> Path:
    """Plan a raw dataset (``<nnUNet_raw>/Dataset<dnum>_*``) with nnU-Net's default planner; returns the plans file.

    nnU-Net runs in a subprocess, with ``nnUNet_raw`` / ``nnUNet_preprocessed`` pointing at ``raw_dataset``'s
    parent and ``work``.
    """
    env = dict(os.environ, nnUNet_raw=str(Path(raw_dataset).parent), nnUNet_preprocessed=str(work / "preprocessed"),
               nnUNet_results=str(work / "results"))
    bindir = Path(sys.executable).parent
    for cmd in (["nnUNetv2_extract_fingerprint", "-d", str(dnum), "-np", "1"],
                ["nnUNetv2_plan_experiment", "-d", str(dnum)]):
        subprocess.run([str(bindir / cmd[0]), *cmd[1:]], env=env, check=True, stdout=subprocess.DEVNULL)
    return work / "preprocessed" / Path(raw_dataset).name / "nnUNetPlans.json"


def write_initialised_model(model_dir: Path, plans_file: Path, dataset_json: Path, configuration: str = "3d_fullres",
                            folds=(0,), seed: int = 0, trainer: str = "nnUNetTrainer") -> Path:
    """Write ``model_dir`` (plans.json, dataset.json, fold_F/checkpoint_{final,best}.pth) with fresh weights.

    Each fold gets its own seed (``seed + index``), so an ensemble's folds differ.
    """
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plans_file, model_dir / "plans.json")
    shutil.copyfile(dataset_json, model_dir / "dataset.json")
    plans = PlansManager(json.loads(Path(plans_file).read_text()))
    ds = json.loads(Path(dataset_json).read_text())
    cm = plans.get_configuration(configuration)
    n_in = determine_num_input_channels(plans, cm, ds)
    n_out = plans.get_label_manager(ds).num_segmentation_heads
    for i, fold in enumerate(folds):
        torch.manual_seed(seed + i)
        net = nnUNetTrainer.build_network_architecture(plans, cm, n_in, n_out, enable_deep_supervision=False)
        ckpt = {"network_weights": net.state_dict(), "trainer_name": trainer,
                "init_args": {"plans": plans.plans, "configuration": configuration, "fold": fold,
                              "dataset_json": ds},
                "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 0}
        (model_dir / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(ckpt, model_dir / f"fold_{fold}" / "checkpoint_final.pth")
        shutil.copyfile(model_dir / f"fold_{fold}" / "checkpoint_final.pth", model_dir / f"fold_{fold}" / "checkpoint_best.pth")
    return model_dir
