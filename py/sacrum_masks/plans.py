"""A small nnU-Net configuration for CPU training, added to ``nnUNetPlans.json`` after planning.

``3d_fullres_small`` inherits everything from ``3d_fullres`` (patch size, spacing, normalisation,
``data_identifier``, so the preprocessed data of 3d_fullres is reused as is) except the number of
features per encoder stage, 8-16-32-64-64 by default instead of 32-64-128-256-320: about 20 times
fewer weights, ~10 times faster per iteration on a CPU.

nnU-Net resolves ``"inherits_from"`` with a shallow ``dict.update`` (``PlansManager``), so the child
carries a complete copy of the parent's ``architecture`` with only ``features_per_stage`` changed.

Three layers: :func:`small_configuration` (pure, on dicts), :func:`add_small_plans` (file in, file out,
atomic, idempotent) and the click command ``sacrum-masks add-plans``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import click

from .config import read_json_object
from .errors import InputError
from .nifti import write_json_atomic

DEFAULT_NAME = "3d_fullres_small"
DEFAULT_FEATURES = (8, 16, 32, 64, 64)


def stage_features(features, n_stages: int) -> list[int]:
    """Features per stage for a network of ``n_stages`` stages.

    The first ``n_stages`` values of ``features``; when the network is deeper than ``features`` is long,
    the last value is repeated (nnU-Net caps its features the same way).

    >>> stage_features((8, 16, 32, 64, 64), 5)
    [8, 16, 32, 64, 64]
    >>> stage_features((8, 16, 32, 64, 64), 4)
    [8, 16, 32, 64]
    >>> stage_features((8, 16, 32, 64, 64), 7)
    [8, 16, 32, 64, 64, 64, 64]
    """
    features = [int(f) for f in features]
    if not features or min(features) < 1:
        raise ValueError(f"features must be positive integers, got {features}")
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    return features[:n_stages] + [features[-1]] * max(0, n_stages - len(features))


def small_configuration(plans: dict, parent: str = "3d_fullres", features=DEFAULT_FEATURES) -> dict:
    """The plans entry of a configuration derived from ``parent`` with fewer features per stage.

    Parameters
    ----------
    plans : dict
        The content of ``nnUNetPlans.json`` (not modified).
    parent : str
        Configuration to derive from (must exist in ``plans["configurations"]``, without inheritance of
        its own architecture).
    features : sequence of int
        Features per stage, adapted to the parent's number of stages by :func:`stage_features`.

    Returns
    -------
    dict
        ``{"inherits_from": parent, "architecture": <parent's architecture with new features_per_stage>}``.
    """
    configs = plans.get("configurations", {})
    if parent not in configs:
        raise KeyError(f"configuration {parent!r} not in plans (found: {sorted(configs)})")
    arch = configs[parent].get("architecture")
    if arch is None or "arch_kwargs" not in arch:
        raise KeyError(f"configuration {parent!r} has no architecture.arch_kwargs")
    arch = copy.deepcopy(arch)
    n_stages = int(arch["arch_kwargs"]["n_stages"])
    arch["arch_kwargs"]["features_per_stage"] = stage_features(features, n_stages)
    return {"inherits_from": parent, "architecture": arch}


def with_small_configuration(plans: dict, name: str = DEFAULT_NAME, parent: str = "3d_fullres",
                             features=DEFAULT_FEATURES) -> dict:
    """A copy of ``plans`` with configuration ``name`` added (or replaced) by :func:`small_configuration`."""
    if name == parent:
        raise ValueError(f"the new configuration cannot replace its parent {parent!r}")
    out = copy.deepcopy(plans)
    out["configurations"][name] = small_configuration(plans, parent, features)
    return out


def add_small_plans(plans_json_path: str | Path, name: str = DEFAULT_NAME, features=DEFAULT_FEATURES,
                    parent: str = "3d_fullres") -> bool:
    """Add configuration ``name`` to an ``nnUNetPlans.json`` file (atomic write, idempotent).

    Returns
    -------
    bool
        True when the file was written, False when it already held exactly this configuration.

    Raises
    ------
    InputError
        Missing or unreadable plans file, or no ``parent`` configuration in it.
    """
    path = Path(plans_json_path)
    if not path.is_file():
        raise InputError(path, "no such plans file (run nnUNetv2_plan_and_preprocess first)")
    plans = read_json_object(path)  # unreadable, not JSON, not an object: one line
    try:
        new = with_small_configuration(plans, name, parent, features)
    except KeyError as exc:
        raise InputError(path, str(exc.args[0])) from None
    if plans.get("configurations", {}).get(name) == new["configurations"][name]:
        return False
    write_json_atomic(new, path)
    return True


def _parse_features(ctx, param, value: str):
    try:
        feats = tuple(int(v) for v in value.replace(",", "-").split("-") if v.strip())
        stage_features(feats, 1)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected positive integers like 8-16-32-64-64") from None
    return feats


@click.command("add-plans")
@click.argument("plans_json", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", default=DEFAULT_NAME, show_default=True, help="name of the new configuration")
@click.option("--parent", default="3d_fullres", show_default=True, help="configuration it inherits from")
@click.option("--features", default="-".join(map(str, DEFAULT_FEATURES)), show_default=True,
              callback=_parse_features, help="features per stage")
def add_plans_command(plans_json: Path, name: str, parent: str, features):
    """Add a small CPU-sized configuration to PLANS_JSON (nnUNetPlans.json), after planning."""
    written = add_small_plans(plans_json, name=name, features=features, parent=parent)
    state = "added" if written else "up to date"
    click.echo(f"add-plans: {state}  {name} ({'-'.join(map(str, features))}, from {parent}) in {plans_json}")
