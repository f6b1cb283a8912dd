"""What a benchmark or a log line needs to say about a device: its name, and a sync point."""

from __future__ import annotations

import platform

import torch

__all__ = ["device_name", "sync"]


def device_name(dev: torch.device) -> str:
    """The GPU's name, or the CPU's with the number of torch threads."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), before reading a clock."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
