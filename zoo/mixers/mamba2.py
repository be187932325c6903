"""Mamba-2 block (Dao & Gu 2024, "Transformers are SSMs", arXiv:2405.21060): state-space duality.

    z, xBC, dt = in_proj(u)                   (B, L, d_inner), (B, L, d_inner + 2 G N), (B, L, H)
    x, B, C    = silu(causal depthwise conv1d(xBC))      x: H heads of width P = headdim
    dt = softplus(dt + dt_bias);  A = -exp(A_log)        one scalar decay per head
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T          per head: a P x N state
    y_t = h_t C_t + D x_t;   out = out_proj(RMSNorm_group(y * silu(z)) * norm.weight)

B and C are shared by the H / G heads of each of the G groups (``ngroups``). Unrolled, it is
causal linear attention with a scalar decay: y_t = sum_{s <= t} exp(b_t - b_s) (C_t . B_s)
dt_s x_s + D x_t with b_t = sum_{r <= t} dt_r A, which is what the chunked form computes.

Parameter names and shapes follow ``mamba_ssm.modules.mamba2.Mamba2`` (in_proj, conv1d,
dt_bias, A_log, D, norm.weight, out_proj; projection order [z, x, B, C, dt]; the same
initialisation: A uniform in A_init_range, dt log-uniform in [dt_min, dt_max] through an
inverse softplus), so a state dict moves unchanged between the zoo and mamba-ssm.

Backends of ``forward``:
  reference  the recurrence above, one position per Python iteration;
  torch      the chunked SSD algorithm: inside chunks of ``chunk`` positions the quadratic
             (attention) form with decays exp(b_i - b_j), exactly 0 above the diagonal and never
             overflowing; across chunks the N x P states carried with each chunk's total decay.
             O(L (chunk + N) d_inner) time;
  mamba_ssm  mamba-ssm's Triton SSD kernel ``mamba_chunk_scan_combined`` (extra ``gpu``; its
             own chunk size, 256), the conv through causal-conv1d when it is installed.
Decoding: conv state (B, d_inner + 2 G N, d_conv) and SSM state (B, H, P, N), constant in length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.contract import SequenceMixer, implements
from zoo.errors import ZooConfigError, at_least
from zoo.mixers import selective_scan
from zoo.nn.attention import MatrixStateAttention


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(z) over groups of ``group_size`` channels, times a weight: mamba-ssm's
    ``RMSNormGated`` with norm_before_gate=False (its parameter: ``weight``)."""

    def __init__(self, width: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = (y * F.silu(z)).unflatten(-1, (-1, self.group_size))
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return g.flatten(-2) * self.weight


class Mamba2(SequenceMixer):
    AUTO_ORDER = ("mamba_ssm", "torch")

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        d_state: int = 128,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        chunk: int = 64,
        backend: str = "auto",
    ):
        if not causal:
            raise ZooConfigError("mamba2 is causal only: its scan runs forward in time. Use causal=True.")
        super().__init__(d_model, causal=True, backend=backend)
        at_least("mamba2", 1, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim, ngroups=ngroups,
                 chunk=chunk)
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ZooConfigError(f"mamba2: expand * d_model = {d_inner} is not divisible by headdim={headdim}; "
                                 f"choose a headdim dividing it")
        H = d_inner // headdim
        if H % ngroups:
            raise ZooConfigError(f"mamba2: its {H} heads (expand * d_model / headdim) do not divide into "
                                 f"ngroups={ngroups} groups; choose ngroups dividing {H}")
        lo, hi = A_init_range
        if not 0 < lo <= hi or not 0 < dt_min <= dt_max:
            raise ZooConfigError(f"mamba2 needs 0 < A_init_range[0] <= A_init_range[1] and 0 < dt_min <= dt_max; "
                                 f"got A_init_range={A_init_range}, dt_min={dt_min}, dt_max={dt_max}")
        self.d_state, self.d_conv, self.expand, self.headdim = d_state, d_conv, expand, headdim
        self.d_inner, self.nheads, self.ngroups, self.chunk = d_inner, H, ngroups, chunk
        self.conv_dim = d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + H, bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias)
        dt = torch.exp(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(lo, hi)))
        self.D = nn.Parameter(torch.ones(H))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # as upstream (see TrainingModule)
        self.norm = GatedRMSNorm(d_inner, d_inner // ngroups)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    # -- the pieces every backend shares ---------------------------------------------------------
    def split(self, zxbcdt: torch.Tensor):
        """in_proj's output (..., d_in_proj) -> z, xBC, dt_raw."""
        return zxbcdt.split([self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def ssm_inputs(self, xBC: torch.Tensor, dt_raw: torch.Tensor):
        """The conv's output (..., conv_dim) and dt_raw (..., H) -> x (..., H, P), B and C
        (..., G, N), dt (..., H) > 0 and A (H) < 0."""
        x, Bm, Cm = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        dt = F.softplus(dt_raw + self.dt_bias.to(dt_raw.dtype))
        A = -torch.exp(self.A_log.to(x.dtype))
        return (x.unflatten(-1, (self.nheads, self.headdim)), Bm.unflatten(-1, (self.ngroups, self.d_state)),
                Cm.unflatten(-1, (self.ngroups, self.d_state)), dt, A)

    def per_head(self, t: torch.Tensor) -> torch.Tensor:
        """(..., G, N) -> (..., H, N): each group's B or C for each of its heads."""
        r = self.nheads // self.ngroups
        return t.repeat_interleave(r, dim=-2) if r > 1 else t

    def finish(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y (..., H, P) and z (..., d_inner) -> (..., d_model)."""
        return self.out_proj(self.norm(y.flatten(-2), z))

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # (B, L, d_model) -> (B, L, d_model)
        return self.implementation("forward", u.device)(u)

    def block(self, u: torch.Tensor, conv_silu, scan) -> torch.Tensor:
        z, xBC, dt_raw = self.split(self.in_proj(u))
        if u.shape[0] == 0 or u.shape[1] == 0:  # empty: nothing to scan
            return self.out_proj(z)
        x, Bm, Cm, dt, A = self.ssm_inputs(conv_silu(xBC, self.conv1d), dt_raw)
        y = scan(x, dt, A, self.per_head(Bm), self.per_head(Cm)) + self.D.to(x.dtype)[:, None] * x
        return self.finish(y, z)

    @implements("reference", op="forward")
    def forward_reference(self, u: torch.Tensor) -> torch.Tensor:
        return self.block(u, selective_scan.conv_silu, self.scan_reference)

    @implements("torch", op="forward")
    def forward_torch(self, u: torch.Tensor) -> torch.Tensor:
        return self.block(u, selective_scan.fast_conv_silu, self.scan_chunked)

    @implements("mamba_ssm", op="forward", package="mamba_ssm", extra="gpu", devices=("cuda",))
    def forward_mamba_ssm(self, u: torch.Tensor) -> torch.Tensor:
        z, xBC, dt_raw = self.split(self.in_proj(u))
        if u.shape[0] == 0 or u.shape[1] == 0:
            return self.out_proj(z)
        if selective_scan.has_causal_conv1d():
            from causal_conv1d import causal_conv1d_fn

            xBC = causal_conv1d_fn(xBC.transpose(1, 2), self.conv1d.weight[:, 0], self.conv1d.bias,
                                   activation="silu").transpose(1, 2)
        else:
            xBC = selective_scan.conv_silu(xBC, self.conv1d)
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        x, Bm, Cm = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        y = mamba_chunk_scan_combined(
            x.unflatten(-1, (self.nheads, self.headdim)), dt_raw, -torch.exp(self.A_log.float()),
            Bm.unflatten(-1, (self.ngroups, self.d_state)), Cm.unflatten(-1, (self.ngroups, self.d_state)),
            chunk_size=256, D=self.D, z=None, dt_bias=self.dt_bias, dt_softplus=True)
        return self.finish(y, z)

    # -- the scans: x (B, L, H, P), dt (B, L, H), A (H), B and C (B, L, H, N) -> y (B, L, H, P) ---
    @staticmethod
    def scan_reference(x, dt, A, Bm, Cm):
        """The recurrence, one position at a time."""
        h, ys = x.new_zeros(*x.shape[:1], x.shape[2], x.shape[3], Bm.shape[-1]), []
        for t in range(x.shape[1]):
            write = (dt[:, t, :, None] * x[:, t])[..., None] * Bm[:, t, :, None, :]  # dt x B^T, (B, H, P, N)
            h = torch.exp(dt[:, t] * A)[..., None, None] * h + write
            ys.append((h @ Cm[:, t, :, :, None])[..., 0])
        return torch.stack(ys, 1)

    def scan_chunked(self, x, dt, A, Bm, Cm):
        """The SSD chunked algorithm (module doc); every exponent <= 0."""
        Bsz, L, H, P = x.shape
        c = min(self.chunk, L)
        n = math.ceil(L / c)
        pad = n * c - L  # padding comes last (dt 0: no write, no decay); causality hides it

        def chunks(t):  # (B, L, H, k) -> (B, H, n, c, k)
            return F.pad(t, (0, 0, 0, 0, 0, pad)).view(Bsz, n, c, H, -1).permute(0, 3, 1, 2, 4)

        v = chunks(dt[..., None] * x)  # what each position writes: dt_s x_s
        k, q = chunks(Bm), chunks(Cm)
        b = chunks((dt * A)[..., None])[..., 0].cumsum(-1)  # (B, H, n, c): log decay from the chunk's start
        lower = torch.ones(c, c, dtype=torch.bool, device=x.device).tril()
        gap = (b[..., :, None] - b[..., None, :]).masked_fill(~lower, 0.0)
        decay = torch.exp(gap).masked_fill(~lower, 0.0)  # exp(b_i - b_j), j <= i
        inner = ((q @ k.transpose(-2, -1)) * decay) @ v  # (B, H, n, c, P)
        last = b[..., -1:]  # (B, H, n, 1)
        added = (k * torch.exp(last - b)[..., None]).transpose(-2, -1) @ v  # (B, H, n, N, P)
        states = MatrixStateAttention.carry(added, torch.exp(last)[..., None])  # before each chunk
        y = inner + (q * torch.exp(b)[..., None]) @ states
        return y.permute(0, 2, 3, 1, 4).reshape(Bsz, n * c, H, P)[:, :L]

    def flops(self, batch: int, length: int) -> int:
        """in_proj and out_proj, the depthwise conv over x, B and C, and the chunked scan's
        products per head and chunk (the length padded to whole chunks): C B^T, its product
        with dt x, each chunk's B^T (dt x) and the read of the carried state by C."""
        BT, di, N, P, H = batch * length, self.d_inner, self.d_state, self.headdim, self.nheads
        proj = 2 * BT * (self.d_model * (2 * di + 2 * self.ngroups * N + H) + di * self.d_model)
        if length == 0:
            return proj
        c = min(self.chunk, length)
        Tp = math.ceil(length / c) * c
        scan = 2 * batch * H * Tp * (c * N + c * P + N * P + N * P)
        return proj + 2 * BT * self.conv_dim * self.d_conv + scan

    # -- decoding ----------------------------------------------------------------------------
    def init_state(self, batch: int, device=None, dtype=None) -> dict:
        w = self.in_proj.weight
        kw = {"device": device or w.device, "dtype": dtype or w.dtype}
        return {"conv": torch.zeros(batch, self.conv_dim, self.d_conv, **kw),
                "ssm": torch.zeros(batch, self.nheads, self.headdim, self.d_state, **kw)}

    def step(self, u_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """u_t (B, d_model) -> (B, d_model); O(d_inner (d_conv + N)) per token. Returns a new
        state; the one given is never changed."""
        return self.implementation("step", u_t.device)(u_t, state)

    @implements("mamba_ssm", op="step", package="mamba_ssm", extra="gpu", devices=("cuda",))
    def step_mamba_ssm(self, u_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        return self.step_recurrent(u_t, state)  # a few small ops per token: no kernel to gain from

    @implements("reference", "torch", op="step")
    def step_recurrent(self, u_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """The recurrence in plain PyTorch, one position."""
        z, xBC, dt_raw = self.split(self.in_proj(u_t))
        conv = torch.cat((state["conv"][..., 1:], xBC[..., None]), -1)  # the last d_conv inputs
        xBC = (conv * self.conv1d.weight[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias
        x, Bm, Cm, dt, A = self.ssm_inputs(F.silu(xBC), dt_raw)  # x (B, H, P), B, C (B, G, N)
        Bm, Cm = self.per_head(Bm), self.per_head(Cm)
        h = torch.exp(dt * A)[..., None, None] * state["ssm"] + (dt[..., None] * x)[..., None] * Bm[:, :, None, :]
        y = (h @ Cm[..., None])[..., 0] + self.D.to(x.dtype)[:, None] * x
        return self.finish(y, z), {"conv": conv, "ssm": h}

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, nheads={self.nheads}, "
                f"headdim={self.headdim}, ngroups={self.ngroups}, chunk={self.chunk}, backend={self.backend!r}")
