"""One compute-dtype policy: which dtype a run computes in, and the autocast that applies it.

``TrainConfig.dtype`` says it: ``float32``, ``bfloat16``, or ``auto`` (bf16 on a GPU, fp32 on
CPU). Weights stay fp32 (the optimizer's copy, and what checkpoints hold); bf16 is applied by
autocast, so matmuls and attention run in bf16 while the residual stream and the losses stay fp32
(:mod:`fastlm.model`). Training, evaluation and inference of a run (``fastlm sample``,
``classify``, ``translate``) all ask :func:`compute_dtype` / :func:`autocast_context` with the
run's setting, so a run trained in fp32 also samples in fp32.

Inside a forward, :func:`active_dtype` says what the policy chose: autocast's dtype where it is on,
else the tensor's own. ``kernels.patch`` (transformers models) applies the same rule itself, as
the kernels package does not import fastlm.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, get_args, get_type_hints

import torch

from .config import Config, ConfigError, TrainConfig

SETTINGS = get_args(get_type_hints(TrainConfig)["dtype"])  # auto, float32, bfloat16


def compute_dtype(setting: Config | str, device: torch.device | str) -> torch.dtype:
    """The dtype a run with ``setting`` (its config, or its ``dtype`` field) computes in on ``device``."""
    name = setting.train.dtype if isinstance(setting, Config) else setting
    if name not in SETTINGS:
        raise ConfigError(f"dtype must be one of {', '.join(SETTINGS)}, got {name!r}")
    if name == "bfloat16" or (name == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return torch.float32


def autocast_context(setting: Config | str, device: torch.device | str) -> ContextManager:
    """What a forward of a run with ``setting`` runs under on ``device``: bf16 autocast, or nothing (fp32
    weights compute in fp32). A new context each call."""
    if compute_dtype(setting, device) == torch.bfloat16:
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def active_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``t`` run in here: autocast's if it is on for ``t``'s device, else ``t``'s own."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype
