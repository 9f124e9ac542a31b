"""``sacrum-masks check-device GPU``: is the requested training/inference device usable?

``GPU`` is what the user gives to ``make train GPU=...``: ``cpu``, or a CUDA device id (``0``, ``1``,
or a comma-separated list such as ``0,1`` as for ``CUDA_VISIBLE_DEVICES``). On success the command
prints the nnU-Net ``-device`` value (``cpu`` or ``cuda``; with ``--torch-device`` the torch device,
e.g. ``cuda:1``) and exits 0; otherwise it prints one line saying why and exits 1, before any work is
done (no silent fall-back to days of CPU training).

When ``CUDA_VISIBLE_DEVICES`` is already set and non-empty (a SLURM allocation), it is left alone and
``GPU`` is an index into that list (``GPU=0`` = the first allocated device, torch ``cuda:0``); when it
is unset, ``CUDA_VISIBLE_DEVICES=GPU`` and torch ``cuda`` (:func:`cuda_selection`).
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


def cuda_selection(gpu: str, visible: str | None) -> tuple[str | None, str]:
    """Where a request runs: ``(CUDA_VISIBLE_DEVICES to set, or None to leave it as is; torch device)``.

    Pure. ``visible`` is the current ``CUDA_VISIBLE_DEVICES``. When it is set and non-empty (a SLURM
    allocation, or a user's choice), it is kept and ``gpu`` indexes it: the torch device is
    ``cuda:<first id of gpu>``. Otherwise ``CUDA_VISIBLE_DEVICES=gpu`` and the torch device is ``cuda``.

    >>> cuda_selection("1", None)
    ('1', 'cuda')
    >>> cuda_selection("0", "2,3")
    (None, 'cuda:0')
    >>> cuda_selection("cpu", "2,3")
    (None, 'cpu')
    """
    if gpu == "cpu":
        return None, "cpu"
    if visible is not None and visible.strip():
        return None, f"cuda:{gpu.split(',')[0]}"
    return gpu, "cuda"


def visible_for(gpu: str, visible: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a process that must run on ``gpu`` (device ids, e.g. ``"1"`` or ``"0,1"``).

    Pure. Without an existing ``visible`` list, that is ``gpu`` itself. With one (a SLURM allocation),
    ``gpu`` indexes it, so the run stays inside the allocation: GPU=1 with ``"2,3"`` is ``"3"``.

    >>> visible_for("1", None), visible_for("1", "2,3"), visible_for("0,1", "5,7")
    ('1', '3', '5,7')
    >>> visible_for("2", "2,3")
    Traceback (most recent call last):
    ...
    ValueError: GPU=2: CUDA_VISIBLE_DEVICES=2,3 has only 2 devices
    """
    if visible is None or not visible.strip():
        return gpu
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    try:
        return ",".join(ids[int(i)] for i in gpu.split(","))
    except (IndexError, ValueError):
        raise ValueError(f"GPU={gpu}: CUDA_VISIBLE_DEVICES={visible} has only {len(ids)} devices") from None


def device_problem(gpu: str, cuda_available: bool, device_count: int, visible: str | None = None,
                   needed: int | None = None) -> str | None:
    """Why ``gpu`` cannot be used, or None when it can (pure: the CUDA facts are arguments).

    Parameters
    ----------
    gpu : str
        Normalised request (:func:`parse_gpu`).
    cuda_available, device_count : bool, int
        ``torch.cuda.is_available()`` and ``torch.cuda.device_count()`` as the run will see them.
    visible : str, optional
        ``CUDA_VISIBLE_DEVICES`` of the run; used in the message only.
    needed : int, optional
        When ``gpu`` holds indices into an existing ``CUDA_VISIBLE_DEVICES`` list: how many visible
        devices they need (largest index + 1). By default one device per id of ``gpu``.

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
    tail = f" (CUDA_VISIBLE_DEVICES={visible})" if visible else ""
    if needed is not None:
        if device_count < needed:
            return (f"GPU={gpu}: only {device_count} CUDA devices are visible, device index {needed - 1} "
                    f"needs {needed}" + tail)
        return None
    wanted = len(gpu.split(","))
    if device_count < wanted:
        return f"GPU={gpu}: only {device_count} of the {wanted} requested CUDA devices are visible" + tail
    return None


def check_device(gpu: str, torch_device: bool = False) -> str:
    """Check that ``gpu`` is usable in this process; return the nnU-Net ``-device`` value.

    For a CUDA request the rule of :func:`cuda_selection` applies in this process: an existing
    non-empty ``CUDA_VISIBLE_DEVICES`` is kept (``gpu`` indexes it), else it is set to ``gpu``; then a
    one-element tensor is allocated on the selected device.

    Parameters
    ----------
    torch_device : bool
        Return the torch device (``cpu``, ``cuda`` or ``cuda:<index>``) instead of nnU-Net's value.

    Raises
    ------
    ValueError
        With a one-line reason when the device cannot be used.
    """
    gpu = parse_gpu(gpu)
    if gpu == "cpu":
        return "cpu"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    to_set, device = cuda_selection(gpu, visible)
    if to_set is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = to_set
    import torch  # after CUDA_VISIBLE_DEVICES, and only when needed (slow import)

    available = bool(torch.cuda.is_available())
    count = int(torch.cuda.device_count()) if available else 0
    needed = None if to_set is not None else max(int(i) for i in gpu.split(",")) + 1
    problem = device_problem(gpu, available, count, os.environ.get("CUDA_VISIBLE_DEVICES"), needed)
    if problem:
        raise ValueError(problem)
    try:
        torch.zeros(1, device="cuda:0" if device == "cuda" else device)
    except RuntimeError as exc:  # busy, wrong driver, out of memory, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"GPU={gpu}: CUDA device cannot be used ({first})") from None
    return device if torch_device else "cuda"


@click.command("check-device")
@click.argument("gpu")
@click.option("--torch-device", is_flag=True,
              help="Print the torch device (cpu, cuda or cuda:<index> when CUDA_VISIBLE_DEVICES is already set).")
def check_device_command(gpu: str, torch_device: bool):
    """Exit 0 and print 'cpu' or 'cuda' when GPU (cpu, or a CUDA id like 0) is usable; else one line, exit 1.

    An existing CUDA_VISIBLE_DEVICES (a SLURM allocation) is kept: GPU is then an index into it.
    """
    try:
        device = check_device(gpu, torch_device)
    except ValueError as exc:
        click.echo(f"sacrum-masks: error: {exc}", err=True)
        sys.exit(1)
    click.echo(device)
