"""FLOP counting: formulas for the ops ``FlopCounterMode`` does not know, registered on import.

PyTorch counts its CUDA attention kernels but not the CPU one that
``scaled_dot_product_attention`` dispatches to on the CPU
(``_scaled_dot_product_flash_attention_for_cpu``), so every attention mixer read as if its
attention were free there (softmax and window reported the FLOPs of their projections alone).
The formulas are PyTorch's own for the CUDA kernels: 2 FLOPs per multiply-add of Q K^T and of
P V (backward: the recomputed scores and the four gradient products), the full square even
when causal, as FlopCounterMode counts every attention kernel.
"""

from __future__ import annotations

import torch
from torch.utils import flop_counter

aten = torch.ops.aten


def _register() -> None:
    fwd = aten._scaled_dot_product_flash_attention_for_cpu
    bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd not in flop_counter.flop_registry:
        @flop_counter.register_flop_formula(fwd)
        def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd not in flop_counter.flop_registry:
        @flop_counter.register_flop_formula(bwd)
        def cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                              **kwargs) -> int:
            return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register()
