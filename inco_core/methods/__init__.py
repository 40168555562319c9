"""Methods by name. Each module defines one :class:`PretrainMethod` subclass."""

from __future__ import annotations

from inco_core.config import PretrainConfig
from inco_core.errors import ConfigError
from inco_core.methods.base import PretrainMethod, StepContext, StepOutput
from inco_core.methods.inco import InCo
from inco_core.methods.mocov2 import MoCoV2
from inco_core.methods.simclr import SimCLR
from inco_core.methods.simsiam import SimSiam
from inco_core.methods.supervised import Supervised
from inco_core.models import Backbone

REGISTRY: dict[str, type[PretrainMethod]] = {cls.name: cls for cls in (InCo, SimCLR, MoCoV2, SimSiam, Supervised)}


def method_class(name: str) -> type[PretrainMethod]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(REGISTRY)}") from None


def build_method(name: str, cfg: PretrainConfig, *, in_channels: int = 1) -> PretrainMethod:
    """A fresh method with a randomly initialised backbone (seed torch first for repeatability)."""
    return method_class(name)(Backbone(in_channels), cfg)


__all__ = [
    "REGISTRY",
    "PretrainMethod",
    "StepContext",
    "StepOutput",
    "build_method",
    "method_class",
]
