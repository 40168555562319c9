"""Device choice and the per-device fast paths (bf16 autocast and channels_last on CUDA)."""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator

import torch

from inco_core.errors import ConfigError


def select_device(choice: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU. ``cuda`` without a GPU is a :class:`ConfigError`."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
    if choice not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {choice!r}: use auto, cpu or cuda")
    return torch.device(choice)


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA; full precision on CPU."""
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def prepare_input(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """channels_last on CUDA, where cuDNN convolutions run faster in that layout."""
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def hardware(device: torch.device) -> str:
    """A one-line description of where a run happened."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"
