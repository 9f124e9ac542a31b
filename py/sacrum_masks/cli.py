"""The ``sacrum-masks`` command: one subcommand per stage, each defined in its own module.

Subcommands are imported only when used (torch and nnU-Net are slow to import).
A :class:`~sacrum_masks.errors.InputError` that reaches this level is printed as one line
(``sacrum-masks: error: <file>: <reason>``) with exit status 2; a :class:`~sacrum_masks.errors.LockBusy`
(another run is writing the same output) is one line with exit status 75 (EX_TEMPFAIL: try again later);
a bug keeps its traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from . import __version__
from .errors import EXIT_BUSY, InputError, LockBusy

#: command name -> "module:attribute" (a click.Command)
COMMANDS = {
    "demo-data": "sacrum_masks.synth:demo_data_command",
    "register-ct": "sacrum_masks.register:register_ct_command",
    "init-config": "sacrum_masks.config:init_config_command",
    "convert": "sacrum_masks.convert:convert_command",
    "add-plans": "sacrum_masks.plans:add_plans_command",
    "evaluate": "sacrum_masks.evaluate:evaluate_command",
    "evaluate-model": "sacrum_masks.model_eval:evaluate_model_command",
    "check-device": "sacrum_masks.device:check_device_command",
    "install-model": "sacrum_masks.model_zip:install_model_command",
    "predict": "sacrum_masks.predict:predict_command",
    "qc": "sacrum_masks.qc:qc_command",
    "ct-labels": "sacrum_masks.ct_labels:ct_labels_command",
    "train": "sacrum_masks.train:train_command",
    "slurm-summary": "sacrum_masks.slurm:slurm_summary_command",
    "slurm-check-array": "sacrum_masks.slurm:slurm_check_array_command",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported on first use."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as exc:
            click.echo(f"sacrum-masks: error: {exc}", err=True)
            sys.exit(2)
        except LockBusy as exc:
            click.echo(f"sacrum-masks: busy: {exc}", err=True)
            sys.exit(EXIT_BUSY)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sacrum-masks")
def main():
    """Sacrum masks for spine MRI: CT labels onto MRI grids, nnU-Net v2 training, BIDS derivatives."""
