"""Where a run executes: device resolution, mixed precision, seeding."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from trainer.runlog import RunError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device={name!r} asked for but CUDA is not available")
    return dev


def amp_on(device: torch.device, amp: str) -> bool:
    """bf16 autocast on cuda ("auto"/"bf16"), on CPU only with "bf16"."""
    return amp == "bf16" or (amp == "auto" and device.type == "cuda")


def numeric_settings(device: str, amp: str) -> dict[str, str]:
    """The runtime settings that change a run's numbers: the device type and the precision
    (threads, progress bars and paths do not). Part of every derived run id."""
    dev = resolve_device(device)
    return {"device": dev.type, "precision": "bf16" if amp_on(dev, amp) else "fp32"}


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on cuda ("auto"/"bf16"), on CPU only with "bf16"."""
    if not amp_on(device, amp):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
