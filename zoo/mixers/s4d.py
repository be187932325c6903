"""S4D: a diagonal, time-invariant state-space layer (Gu, Gupta, Goel & Re 2022, "On the
Parameterization and Initialization of Diagonal State Space Models", arXiv:2206.11893).

Per channel h (H = d_model channels) and complex mode n (N/2 modes, conjugate pairs implied):

    A_n = -exp(log_A_real_n) + i A_imag_n        S4D-Lin init: A_n = -1/2 + i pi n
    dt  = exp(log_dt)                            log-uniform in [dt_min, dt_max]
    dA  = exp(dt A),   C'_n = C_n (exp(dt A_n) - 1) / A_n      (zero-order hold, B = 1)
    h_t = dA h_{t-1} + u_t,    y_t = 2 Re(sum_n C'_n h_t,n) + D u_t
    equivalently y = K * u + D u with the kernel K_l = 2 Re(sum_n C'_n dA_n^l)
    out = out_proj(gelu(y)) through a GLU (Linear d -> 2d, then a * sigmoid(b))

It is the zoo's time-invariant baseline: dA, C' and K do not depend on the input, which is what
the Mamba paper's selective-copying result contrasts with a selective SSM (S4: 18.3 %).

Backends:
  reference  the recurrence above, one time step per Python iteration;
  torch      chunked: inside chunks of ``chunk`` positions a lower-triangular Toeplitz product
             with K[0:chunk]; across chunks the modes' state, carried forward exactly. Time
             O(T (chunk + N) d), linear in T.
Why not the FFT convolution of the paper (O(T log T)): its rounding mixes every position, so
later inputs change earlier outputs in the last bits, and the zoo's causality is on values
(bit-identical past outputs); the chunked form is exact and no slower in T.
Decoding: the state h (B, d_model, N/2) complex, constant in length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.contract import SequenceMixer, implements
from zoo.errors import ZooConfigError


class S4D(SequenceMixer):
    AUTO_ORDER = ("torch",)

    def __init__(self, d_model: int, *, causal: bool = True, d_state: int = 64, dt_min: float = 0.001,
                 dt_max: float = 0.1, chunk: int = 64, backend: str = "auto"):
        if not causal:
            raise ZooConfigError("s4d is causal only here: its recurrence runs forward in time. Use causal=True.")
        super().__init__(d_model, causal=True, backend=backend)
        if d_state < 2 or d_state % 2 or chunk < 1 or not 0 < dt_min <= dt_max:
            raise ZooConfigError(f"s4d needs an even d_state >= 2, chunk >= 1 and 0 < dt_min <= dt_max; got "
                                 f"d_state={d_state}, chunk={chunk}, dt_min={dt_min}, dt_max={dt_max}")
        H, M = d_model, d_state // 2  # channels, complex modes
        self.d_state, self.chunk = d_state, chunk
        self.log_dt = nn.Parameter(torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(H, M, dtype=torch.cfloat)))  # (H, M, 2)
        self.log_A_real = nn.Parameter(torch.log(0.5 * torch.ones(H, M)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(M, dtype=torch.float32).repeat(H, 1))
        self.D = nn.Parameter(torch.randn(H))
        for p in (self.log_dt, self.log_A_real, self.A_imag):
            p._no_weight_decay = True  # as the S4 code registers them (see TrainingModule)
        self.out_proj = nn.Linear(d_model, 2 * d_model)

    # -- the discretised system ----------------------------------------------------------------
    def discrete(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """dt A and C' (H, N/2), complex of ``dtype``'s precision (complex128 for float64)."""
        real = torch.float64 if dtype == torch.float64 else torch.float32
        A = torch.complex(-torch.exp(self.log_A_real.to(real)), self.A_imag.to(real))
        dtA = A * torch.exp(self.log_dt.to(real))[:, None]
        C = torch.view_as_complex(self.C.to(real).contiguous())
        return dtA, C * torch.expm1(dtA) / A

    def step_coefficients(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """exp(dt A) and C' for one decoding step. Without autograd (decoding for inference) they
        are computed once and kept until a parameter changes (its version counter moves: an
        optimiser step, load_state_dict) or the dtype or device does; with autograd, every call
        builds them afresh so that gradients reach the parameters."""
        if torch.is_grad_enabled():
            dtA, C = self.discrete(dtype)
            return torch.exp(dtA), C
        params = (self.log_A_real, self.A_imag, self.log_dt, self.C)
        key = (dtype, self.C.device, *(id(p) for p in params), *(p._version for p in params))
        if getattr(self, "_step_cache", (None,))[0] != key:
            dtA, C = self.discrete(dtype)
            self._step_cache = (key, torch.exp(dtA), C)
        return self._step_cache[1], self._step_cache[2]

    @staticmethod
    def powers(dtA: torch.Tensor, length: int) -> torch.Tensor:
        """dA^l = exp(l dt A) for l = 0 .. length - 1: (H, N/2, length)."""
        return torch.exp(dtA[..., None] * torch.arange(length, device=dtA.device))

    def finish(self, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The skip term, the activation and the GLU output projection; u, y (..., d_model)."""
        y = F.gelu(y.to(u.dtype) + self.D.to(u.dtype) * u)
        return F.glu(self.out_proj(y), dim=-1)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, u: torch.Tensor) -> torch.Tensor:  # (B, T, d_model) -> (B, T, d_model)
        return self.finish(u, self.convolve(u))

    def convolve(self, u: torch.Tensor) -> torch.Tensor:
        """The linear, time-invariant part: (K * u) per channel, (B, T, H) -> (B, T, H)."""
        return self.implementation("convolve", u.device)(u)

    @implements("reference", op="convolve")
    def convolve_reference(self, u: torch.Tensor) -> torch.Tensor:
        h, ys = self.init_state(u.shape[0], device=u.device, dtype=u.dtype)["h"], []
        dtA, C = self.discrete(u.dtype)
        dA = torch.exp(dtA)
        for t in range(u.shape[1]):
            h = dA * h + u[:, t, :, None]  # (B, H, M)
            ys.append(2 * (h * C).sum(-1).real)
        return torch.stack(ys, 1).to(u.dtype) if ys else u.new_zeros(u.shape)

    @implements("torch", op="convolve")
    def convolve_torch(self, u: torch.Tensor) -> torch.Tensor:
        B, T, H = u.shape
        if B == 0 or T == 0:
            return u.new_zeros(u.shape)
        c = min(self.chunk, T)
        n = math.ceil(T / c)
        dtA, C = self.discrete(u.dtype)
        powers = self.powers(dtA, c + 1)  # (H, M, c + 1): dA^0 .. dA^c
        K = 2 * torch.einsum("hm,hml->hl", C, powers[..., :c]).real  # (H, c)
        lag = torch.arange(c, device=u.device)
        lag = lag[:, None] - lag[None, :]  # (c, c): t - s
        toeplitz = torch.where(lag >= 0, K[:, lag.clamp(min=0)], 0.0)  # (H, c, c), zero above the diagonal
        x = F.pad(u, (0, 0, 0, n * c - T)).view(B, n, c, H).to(K.dtype)  # padding comes last: causal
        y = torch.einsum("hts,bnsh->bnth", toeplitz, x)  # within each chunk
        # across chunks: the state after chunk k, h_k = dA^c h_{k-1} + sum_s dA^(c-1-s) x_s, and its
        # effect at offset t of the next chunk, 2 Re(sum_n C'_n dA_n^(t+1) h_n)
        into = torch.einsum("hms,bnsh->bnhm", powers[..., :c].flip(-1), x.to(powers.dtype))
        read = C[..., None] * powers[..., 1:]  # (H, M, c): C' dA^(t+1)
        h = torch.zeros(B, H, C.shape[1], dtype=C.dtype, device=u.device)
        carried = []
        step = powers[..., c]
        for into_k in into.unbind(1):  # state before chunk k: the earlier chunks only (unbind: one
            carried.append(h)         # stacked gradient, not a whole-tensor zero per chunk)
            h = step * h + into_k
        carried = torch.stack(carried, 1)  # (B, n, H, M)
        y = y + 2 * torch.einsum("bnhm,hmt->bnth", carried, read).real
        return y.reshape(B, n * c, H)[:, :T].to(u.dtype)

    def flops(self, batch: int, length: int) -> int:
        """The GLU output projection, the real Toeplitz product inside each chunk (the length
        padded to whole chunks), and the complex products with the N/2 modes: the kernel K, what
        each chunk puts into the state and how the next chunk reads it; a complex multiply-add
        is 8 real FLOPs (FlopCounterMode counts it as 2: :meth:`complex_flops` is the rest)."""
        H, c = self.d_model, min(self.chunk, max(length, 1))
        proj = 2 * batch * length * H * 2 * H
        if length == 0:
            return proj
        Tp = math.ceil(length / c) * c
        return proj + 2 * batch * Tp * c * H + 4 * self.complex_macs(batch, length) * 2

    def complex_macs(self, batch: int, length: int) -> int:
        """Complex multiply-adds of the torch backend: K (H, M, c), into and read (B, Tp, H, M)."""
        if length == 0:
            return 0
        H, M, c = self.d_model, self.d_state // 2, min(self.chunk, length)
        Tp = math.ceil(length / c) * c
        return H * M * c + 2 * batch * Tp * H * M

    def complex_flops(self, batch: int, length: int) -> int:
        """What :meth:`flops` adds to FlopCounterMode's count: 6 more FLOPs per complex multiply-add."""
        return 6 * self.complex_macs(batch, length)

    # -- decoding ------------------------------------------------------------------------------
    def init_state(self, batch: int, device=None, dtype=None) -> dict:
        dtype = dtype or self.out_proj.weight.dtype
        complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        return {"h": torch.zeros(batch, self.d_model, self.d_state // 2, dtype=complex_dtype,
                                 device=device or self.out_proj.weight.device)}

    def step(self, u_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """u_t (B, d_model) -> (B, d_model); a new state (the one given is not changed)."""
        dA, C = self.step_coefficients(u_t.dtype)
        h = dA * state["h"] + u_t[..., None]
        return self.finish(u_t, 2 * (h * C).sum(-1).real), {"h": h}

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_state={self.d_state}, chunk={self.chunk}, backend={self.backend!r}"
