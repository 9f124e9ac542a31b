"""``nnUNetTrainer_SacrumCPU``: a few-minute nnU-Net v2 training for the demo and the tests (CPU).

Stock ``nnUNetTrainer`` runs 1000 epochs of 250 iterations; on 2 CPU cores one 3d_fullres iteration
takes ~10 s, so even nnU-Net's ``nnUNetTrainer_1epoch`` needs 40+ minutes. This trainer runs
``SACRUM_CPU_EPOCHS`` epochs (default 6) of ``SACRUM_CPU_ITERS`` iterations (default 25), with
``iters // 5`` validation iterations, and writes ``checkpoint_latest.pth`` after every epoch so that an
interrupted run resumes (``nnUNetv2_train ... --c``) where it stopped. Use it with the
``3d_fullres_small`` configuration (``sacrum-masks add-plans``) on small images.

The optimiser is AdamW (learning rate 3e-3, nnU-Net's polynomial decay) instead of nnU-Net's SGD
(1e-2, Nesterov momentum 0.99), which needs a few hundred iterations before it predicts any
foreground: on the demo data, pseudo Dice after epochs 1 and 2 was 0.04 and 0.36 with SGD, 0.24 and
0.69 with AdamW.

Mirroring is off, both as augmentation and as test-time augmentation (as nnU-Net's
``nnUNetTrainerNoMirroring``): with mirroring, every CPU prediction (validation, test split, stage 4)
runs the network 8 times; without it, once. Flips along the anterior-posterior or superior-inferior
axis do not occur in sacrum images anyway.

The number of data-augmentation worker processes is nnU-Net's own: ``nnUNet_n_proc_DA``
(0 = augment in the main process).

This module is imported by nnU-Net as a top-level module (see this package's ``__init__``):
absolute imports only.
"""

import os

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    """Read a positive integer from the environment; a bad value is a one-line error naming it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected an integer >= {minimum}") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r}: expected an integer >= {minimum}")
    return value


class nnUNetTrainer_SacrumCPU(nnUNetTrainer):
    """nnU-Net trainer sized for a CPU: few epochs, few iterations, a checkpoint every epoch.

    Environment
    -----------
    SACRUM_CPU_EPOCHS : int, default 6
        Number of epochs.
    SACRUM_CPU_ITERS : int, default 25
        Training iterations per epoch (validation: ``max(1, iters // 5)``).
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = _env_int("SACRUM_CPU_EPOCHS", 6)
        self.num_iterations_per_epoch = _env_int("SACRUM_CPU_ITERS", 25)
        self.num_val_iterations_per_epoch = max(1, self.num_iterations_per_epoch // 5)
        self.initial_lr = 3e-3
        self.save_every = 1

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None
