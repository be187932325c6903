"""flash-linear-attention's Triton kernels (package ``fla``, extra ``gpu``, CUDA only) behind the
``fla`` backend of retnet, gla, deltanet and gated_deltanet.

The zoo's ``attend`` works in (B, H, T, d); fla's kernels take (B, T, H, d). Older fla releases
default to the head-first layout and newer ones dropped the ``head_first`` argument, so
:func:`call` passes ``head_first=False`` only where the kernel still has it. Every kernel gets
``scale=1.0``: the callers scale q or k themselves, as their torch backends do.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import torch


@functools.cache
def _has_head_first(fn) -> bool:  # read once per kernel, not on every call
    return "head_first" in inspect.signature(fn).parameters


def kernel(module: str, name: str):
    """fla.ops.<module>.<name>, imported on first use (it cannot import without CUDA/Triton)."""
    return getattr(importlib.import_module(f"fla.ops.{module}"), name)


def call(fn, *args: torch.Tensor, **kwargs) -> torch.Tensor:
    """fn on (B, H, T, ...) tensors (per-head gates (B, H, T) too), in fla's (B, T, H, ...)
    layout; returns the output in (B, H, T, d_v)."""
    moved = [a.transpose(1, 2).contiguous() for a in args]
    if _has_head_first(fn):
        kwargs["head_first"] = False
    out = fn(*moved, scale=1.0, **kwargs)
    o = out[0] if isinstance(out, tuple) else out
    return o.transpose(1, 2)
