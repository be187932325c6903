"""Mamba-1 block (Gu & Dao 2023): the selective state-space mixer.

    x, z   = in_proj(u)                                  (B, L, d_inner) each
    x      = silu(causal depthwise conv1d(x))
    dt,B,C = x_proj(x);  dt = dt_proj.weight @ dt        (B, L, d_inner), (B, L, N), (B, L, N)
    delta  = softplus(dt + dt_proj.bias);  A = -exp(A_log)
    h_t    = exp(delta_t A) h_{t-1} + delta_t B_t x_t    (per channel: a diagonal N-state SSM)
    y_t    = C_t . h_t + D x_t;   out = out_proj(y * silu(z))

Parameter names and shapes follow ``mamba_ssm.modules.mamba_simple.Mamba`` (in_proj, conv1d,
x_proj, dt_proj, A_log, D, out_proj), so a state dict moves unchanged between the zoo,
mamba-ssm, mambapy's ``MambaBlock`` and Hugging Face's ``MambaMixer``; the initialisation is
theirs too (S4D-real A, log-uniform dt in [dt_min, dt_max] through an inverse softplus).

Backends of the selective scan (``zoo.mixers.selective_scan``):
  reference  the step-by-step recurrence, a Python loop over time;
  torch      the zoo's own scan: a compiled C++ kernel when it builds on this machine (CPU,
             fp32/fp64; sequential in time, vectorised over channels, chunk states saved and
             recomputed in backward), else a chunked parallel scan in PyTorch with per-chunk
             recomputation. Neither holds (B, L, d_inner, N) for the whole sequence;
  mamba_ssm  mamba-ssm's CUDA kernels (extra ``gpu``), with the same weights: with causal-conv1d
             the whole block is upstream's fused ``mamba_inner_fn`` and a decode step is
             ``causal_conv1d_update`` + ``selective_state_update`` (on copies of the state:
             they update in place); without it, ``selective_scan_fn`` behind nn.Conv1d.
Decoding: conv state (B, d_inner, d_conv) and SSM state (B, d_inner, N), constant in length.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.contract import SequenceMixer, implements
from zoo.errors import ZooConfigError
from zoo.mixers import selective_scan


class Mamba(SequenceMixer):
    AUTO_ORDER = ("mamba_ssm", "torch")

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int = 0,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        chunk: int = 64,
        backend: str = "auto",
    ):
        if not causal:
            raise ZooConfigError("mamba is causal only: its scan runs forward in time. Use causal=True.")
        super().__init__(d_model, causal=True, backend=backend)
        if dt_init not in ("random", "constant"):
            raise ZooConfigError(f"mamba dt_init must be 'random' or 'constant', got {dt_init!r}")
        if min(d_state, d_conv, expand, chunk) < 1 or dt_rank < 0:
            raise ZooConfigError(
                f"mamba needs d_state, d_conv, expand, chunk >= 1 and dt_rank >= 0 (0 = ceil(d_model/16)); "
                f"got d_state={d_state}, d_conv={d_conv}, expand={expand}, chunk={chunk}, dt_rank={dt_rank}"
            )
        self.d_state, self.d_conv, self.expand, self.chunk = d_state, d_conv, expand, chunk
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        di, N, R = self.d_inner, d_state, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias)
        self.conv1d = nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1, bias=conv_bias)
        self.x_proj = nn.Linear(di, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, di, bias=True)
        std = R**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, std)
            else:
                nn.init.uniform_(self.dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(di) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            dt = dt.clamp(min=dt_init_floor)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32).repeat(di, 1)))
        self.D = nn.Parameter(torch.ones(di))
        self.A_log._no_weight_decay = self.D._no_weight_decay = True  # as upstream (see TrainingModule)
        self.out_proj = nn.Linear(di, d_model, bias=bias)

    def ssm_inputs(self, x: torch.Tensor):
        """(B, L, d_inner) conv output -> delta_raw (B, L, d_inner), B (B, L, N), C (B, L, N)."""
        dt, Bm, Cm = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return dt @ self.dt_proj.weight.t(), Bm, Cm

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # (B, L, d_model) -> (B, L, d_model)
        return self.implementation("forward", u.device)(u)

    @implements("reference", op="forward")
    def forward_reference(self, u: torch.Tensor) -> torch.Tensor:
        return self.unfused(u, selective_scan.conv_silu, selective_scan.reference_scan)

    @implements("torch", op="forward")
    def forward_torch(self, u: torch.Tensor) -> torch.Tensor:
        scan = functools.partial(selective_scan.fast_scan, chunk=self.chunk)
        return self.unfused(u, selective_scan.fast_conv_silu, scan)

    @implements("mamba_ssm", op="forward", package="mamba_ssm", extra="gpu", devices=("cuda",))
    def forward_mamba_ssm(self, u: torch.Tensor) -> torch.Tensor:
        if u.shape[0] and u.shape[1] and selective_scan.has_causal_conv1d():
            return selective_scan.mamba_ssm_block(self, u)  # the fused CUDA block, as upstream
        return self.unfused(u, selective_scan.conv_silu, selective_scan.mamba_ssm_scan, fp32_params=True)

    def unfused(self, u: torch.Tensor, conv_silu, scan, fp32_params: bool = False) -> torch.Tensor:
        """The block with the given causal conv + silu and selective scan (see the module doc)."""
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, L, d_inner)
        if x.shape[0] == 0 or x.shape[1] == 0:  # empty: nothing to scan
            return self.out_proj(x)
        x = conv_silu(x, self.conv1d)
        delta, Bm, Cm = self.ssm_inputs(x)
        dtype = torch.float32 if fp32_params else x.dtype  # mamba-ssm's kernel takes them in fp32
        A, D, bias = -torch.exp(self.A_log.to(dtype)), self.D.to(dtype), self.dt_proj.bias.to(dtype)
        y = scan(x, delta, A, Bm, Cm, D, z, bias)
        return self.out_proj(y)

    def flops(self, batch: int, length: int) -> int:
        """The projections (in, x, dt, out), the depthwise conv, and the scan's multiply-adds:
        per position, channel and state, exp(delta A) h (1), + delta B x (2), C . h (2), plus
        delta x once per channel (the exponential itself is not counted)."""
        BT, di, N, R = batch * length, self.d_inner, self.d_state, self.dt_rank
        proj = 2 * BT * (self.d_model * 2 * di + di * (R + 2 * N) + R * di + di * self.d_model)
        return proj + 2 * BT * di * self.d_conv + self.scan_flops(batch, length)

    def scan_flops(self, batch: int, length: int) -> int:
        """The selective scan's part of :meth:`flops` (FlopCounterMode cannot see it: the C++
        kernel, or elementwise products)."""
        return batch * length * self.d_inner * (5 * self.d_state + 1)

    # -- decoding ----------------------------------------------------------------------------
    def init_state(self, batch: int, device=None, dtype=None) -> dict:
        w = self.in_proj.weight
        kw = {"device": device or w.device, "dtype": dtype or w.dtype}
        return {"conv": torch.zeros(batch, self.d_inner, self.d_conv, **kw),
                "ssm": torch.zeros(batch, self.d_inner, self.d_state, **kw)}

    def step(self, u_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """u_t (B, d_model) -> (B, d_model); O(d_inner * (d_conv + N)) per token. Returns a new
        state; the one given is never changed."""
        return self.implementation("step", u_t.device)(u_t, state)

    @implements("mamba_ssm", op="step", package="mamba_ssm", extra="gpu", devices=("cuda",))
    def step_mamba_ssm(self, u_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        if selective_scan.has_causal_conv1d():
            return selective_scan.mamba_ssm_step(self, u_t, state)
        return self.step_recurrent(u_t, state)

    @implements("reference", "torch", op="step")
    def step_recurrent(self, u_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """The recurrence in plain PyTorch, one position."""
        x, z = self.in_proj(u_t).chunk(2, dim=-1)  # (B, d_inner)
        conv = torch.cat((state["conv"][..., 1:], x[..., None]), -1)  # the last d_conv inputs
        x = (conv * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = F.silu(x)
        delta, Bm, Cm = self.ssm_inputs(x)
        delta = F.softplus(delta + self.dt_proj.bias)  # (B, d_inner)
        A = -torch.exp(self.A_log.to(x.dtype))
        h = torch.exp(delta[..., None] * A) * state["ssm"] + (delta * x)[..., None] * Bm[:, None, :]
        y = (h * Cm[:, None, :]).sum(-1) + self.D * x
        return self.out_proj(y * F.silu(z)), {"conv": conv, "ssm": h}

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}, backend={self.backend!r}")
