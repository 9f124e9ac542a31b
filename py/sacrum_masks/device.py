"""``sacrum-masks check-device GPU``: is the requested training/inference device usable?

``GPU`` is what the user gives to ``make train GPU=...``: ``cpu``, or a CUDA device id (``0``, ``1``,
or a comma-separated list such as ``0,1`` as for ``CUDA_VISIBLE_DEVICES``). On success the command
prints the nnU-Net ``-device`` value (``cpu`` or ``cuda``) and exits 0; otherwise it prints one line
saying why and exits 1, before any work is done (no silent fall-back to days of CPU training).
"""

from __future__ import annotations

import os
import re
import sys

import click

_GPU_IDS = re.compile(r"^\d+(,\d+)*$")


def parse_gpu(gpu: str) -> str:
    """Normalise a GPU request: ``"cpu"`` or a comma-separated list of device ids.

    >>> parse_gpu(" CPU ")
    'cpu'
    >>> parse_gpu("0,1")
    '0,1'
    >>> parse_gpu("cuda")
    Traceback (most recent call last):
    ...
    ValueError: GPU='cuda': expected 'cpu' or a CUDA device id such as 0 (or a list such as 0,1)
    """
    value = gpu.strip()
    if value.lower() == "cpu":
        return "cpu"
    if _GPU_IDS.match(value):
        return value
    raise ValueError(f"GPU={gpu!r}: expected 'cpu' or a CUDA device id such as 0 (or a list such as 0,1)")


def device_problem(gpu: str, cuda_available: bool, device_count: int, visible: str | None = None) -> str | None:
    """Why ``gpu`` cannot be used, or None when it can (pure: the CUDA facts are arguments).

    Parameters
    ----------
    gpu : str
        Normalised request (:func:`parse_gpu`).
    cuda_available, device_count : bool, int
        ``torch.cuda.is_available()`` and ``torch.cuda.device_count()`` with ``CUDA_VISIBLE_DEVICES=gpu``.
    visible : str, optional
        Used in the message only.

    >>> device_problem("cpu", False, 0) is None
    True
    >>> device_problem("0", False, 0)
    'GPU=0: CUDA is not available on this machine (no GPU or no CUDA build of torch); use GPU=cpu to train on the CPU (slow)'
    """
    if gpu == "cpu":
        return None
    if not cuda_available or device_count == 0:
        return (f"GPU={gpu}: CUDA is not available on this machine (no GPU or no CUDA build of torch); "
                f"use GPU=cpu to train on the CPU (slow)")
    wanted = len(gpu.split(","))
    if device_count < wanted:
        return f"GPU={gpu}: only {device_count} of the {wanted} requested CUDA devices are visible" + (
            f" (CUDA_VISIBLE_DEVICES={visible})" if visible else "")
    return None


def check_device(gpu: str) -> str:
    """Check that ``gpu`` is usable in this process; return the nnU-Net ``-device`` value.

    For a CUDA request, ``CUDA_VISIBLE_DEVICES`` is set to ``gpu`` in this process (as bin/train.sh does
    for nnU-Net) and a one-element tensor is allocated on the first visible device.

    Raises
    ------
    ValueError
        With a one-line reason when the device cannot be used.
    """
    gpu = parse_gpu(gpu)
    if gpu == "cpu":
        return "cpu"
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    import torch  # after CUDA_VISIBLE_DEVICES, and only when needed (slow import)

    available = bool(torch.cuda.is_available())
    count = int(torch.cuda.device_count()) if available else 0
    problem = device_problem(gpu, available, count, gpu)
    if problem:
        raise ValueError(problem)
    try:
        torch.zeros(1, device="cuda:0")
    except RuntimeError as exc:  # busy, wrong driver, out of memory, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"GPU={gpu}: CUDA device cannot be used ({first})") from None
    return "cuda"


@click.command("check-device")
@click.argument("gpu")
def check_device_command(gpu: str):
    """Exit 0 and print 'cpu' or 'cuda' when GPU (cpu, or a CUDA id like 0) is usable; else one line, exit 1."""
    try:
        device = check_device(gpu)
    except ValueError as exc:
        click.echo(f"sacrum-masks: error: {exc}", err=True)
        sys.exit(1)
    click.echo(device)
