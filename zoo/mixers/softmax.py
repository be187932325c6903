"""Full softmax attention (Vaswani et al. 2017) with a KV-cache decoder.

Backends of ``attend``:
  reference  the textbook softmax(Q K^T / sqrt(d) + bias) V, materialising the T x T scores;
  torch      ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where they
             apply, so memory grows linearly in T);
  xformers   ``xformers.ops.memory_efficient_attention`` (CUDA only, extra ``gpu``).
``auto`` takes torch everywhere: xformers is opt-in (``backend: xformers``), as it showed no
measured gain over SDPA's own fused kernels and its wheels pin one torch version.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo.contract import claim_buffers, implements
from zoo.nn.attention import AttentionMixer


class SoftmaxAttention(AttentionMixer):
    AUTO_ORDER = ("torch",)

    @implements("reference", op="attend")
    def attend_reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = (q @ k.transpose(-2, -1)) * self.scale  # (B, H, Tq, Tk)
        bias = self.score_bias(q.shape[-2], k.shape[-2], q.device, q.dtype)
        if bias is not None:
            scores = scores + bias
        probs = F.dropout(scores.softmax(dim=-1), self.dropout if self.training else 0.0)
        return probs @ v  # (B, H, Tq, hd)

    @implements("torch", op="attend")
    def attend_torch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        tq, tk = q.shape[-2], k.shape[-2]
        if not self.uses_alibi and (tq == tk or tq == 1):
            # Fast path: the fused kernels' own causal mask (a single query sees every key).
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal and tq > 1)
        bias = self.score_bias(tq, tk, q.device, q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)

    @implements("xformers", op="attend", package="xformers", extra="gpu", devices=("cuda",))
    def attend_xformers(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        bias = self.score_bias(q.shape[-2], k.shape[-2], q.device, q.dtype)
        p = self.dropout if self.training else 0.0
        return _xformers_attend(q, k, v, bias, self.causal and not self.uses_alibi, p)

    # -- decoding: a KV cache that doubles its capacity when full ------------------------
    def attend_flops(self, batch: int, length: int) -> int:
        """Q K^T and P V over the full square, as every attention kernel counts (a causal kernel
        may skip the masked half; FlopCounterMode and nanoGPT's estimate count it too)."""
        return 4 * batch * self.n_heads * length * length * self.head_dim

    def init_state(self, batch: int, device=None, dtype=None, capacity: int = 64) -> dict:
        shape = (batch, self.n_heads, capacity, self.head_dim)
        dtype = dtype or self.qkv.weight.dtype
        device = device or self.qkv.weight.device
        return {
            "k": torch.empty(shape, device=device, dtype=dtype),
            "v": torch.empty(shape, device=device, dtype=dtype),
            "length": 0,
            "written": [0],  # shared by the states that share k and v (zoo.contract.claim_buffers)
        }

    def step(self, x_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """x_t: (B, d) -> y_t: (B, d); appends this position's key and value to the cache, in
        place unless another branch already wrote there (then it copies: copy-on-write)."""
        n = state["length"]
        q, k, v = self.project(x_t[:, None], start=n)  # (B, H, 1, hd)
        if n == state["k"].shape[2]:  # full: double the capacity into new buffers of its own
            K, V = (torch.cat((state[s], torch.empty_like(state[s])), dim=2) for s in ("k", "v"))
            written = [n + 1]
        else:
            state = claim_buffers(state, ("k", "v"))
            K, V, written = state["k"], state["v"], state["written"]
        K[:, :, n : n + 1], V[:, :, n : n + 1] = k, v
        y = self.attend(q, K[:, :, : n + 1], V[:, :, : n + 1])
        return self.merge(y)[:, 0], {"k": K, "v": V, "length": n + 1, "written": written}


def _xformers_attend(q, k, v, bias, causal: bool, p: float) -> torch.Tensor:
    """memory_efficient_attention on (B, T, H, hd) layouts; ``bias`` is (H|1, Tq, Tk) or None."""
    from xformers.ops import LowerTriangularMask, memory_efficient_attention

    B, H, tq, hd = q.shape
    tk = k.shape[-2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, T, H, hd)
    if causal and tq == tk:
        attn_bias = LowerTriangularMask()
    elif bias is not None:
        # xformers wants the bias's last dimension padded to a multiple of 8.
        pad = -tk % 8
        full = torch.zeros(B, H, tq, tk + pad, device=q.device, dtype=q.dtype)
        full[..., :tk] = bias
        attn_bias = full[..., :tk]
    else:
        attn_bias = None
    return memory_efficient_attention(q, k, v, attn_bias=attn_bias, p=p).transpose(1, 2)
