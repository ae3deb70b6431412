"""One reading of ``--device`` for every command and the Python API.

    auto     CUDA when torch sees a GPU (GPU $LOCAL_RANK under torchrun), else the CPU; never MPS
             unasked, since its kernels' numbers differ from the CPU's and CUDA's
    cpu      the CPU
    cuda     GPU $LOCAL_RANK under torchrun (one process per GPU), else GPU 0
    cuda:N   GPU N exactly, under torchrun too: a user who names a GPU gets that GPU
    mps      Apple's GPU, when this torch build and machine have one

Anything else is refused on one line. ``check_device`` checks the spelling without torch (the
configs call it when they are built); ``parse_device`` also asks torch what exists.
"""

from __future__ import annotations

import os
import re

from adl.errors import AdlError

SPELLINGS = "auto, cpu, cuda, cuda:N or mps"
HELP = "auto (default) | cpu | cuda | cuda:N | mps"
_FORM = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device(spec) -> str:
    """``spec`` if it is one of the accepted spellings, else AdlError."""
    if not isinstance(spec, str) or not _FORM.fullmatch(spec):
        raise AdlError(f"--device {spec!r} is not a device: use {SPELLINGS}")
    return spec


def parse_device(spec: str) -> str:
    """The torch device string ``cpu``, ``cuda:N`` or ``mps`` that ``spec`` names on this machine.

    Raises AdlError when the device is misspelt or this machine does not have it.
    """
    import torch

    check_device(spec)
    if spec == "cpu":
        return "cpu"
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise AdlError(f"--device mps, but torch {torch.__version__} has no MPS device here (it needs Apple "
                           "silicon and a macOS build of torch): use --device cpu")
        return "mps"
    if spec == "auto" and not torch.cuda.is_available():
        return "cpu"
    if not torch.cuda.is_available():
        raise AdlError(f"--device {spec}, but torch {torch.__version__} sees no CUDA device: use --device cpu "
                       "(or auto), or install a CUDA build of torch")
    index = int(spec.split(":")[1]) if ":" in spec else _local_rank()
    count = torch.cuda.device_count()
    if index >= count:
        raise AdlError(f"--device {spec} names GPU {index}, but torch sees {count} (cuda:0 .. cuda:{count - 1})")
    return f"cuda:{index}"


def _local_rank() -> int:
    """The GPU torchrun gives this process ($LOCAL_RANK), 0 outside torchrun."""
    value = os.environ.get("LOCAL_RANK", "0")
    if not value.isdigit():
        raise AdlError(f"$LOCAL_RANK is {value!r}, not a GPU index: unset it or let torchrun set it")
    return int(value)
