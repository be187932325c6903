"""Selective scans of Mamba-1: the reference loop, the zoo's fast CPU scans, mamba-ssm's kernel.

All take u, delta_raw, z: (B, L, D); A: (D, N); B, C: (B, L, N); D_skip, delta_bias: (D,) and
return (C_t . h_t + D_skip u_t) * silu(z_t), (B, L, D), where delta = softplus(delta_raw +
delta_bias) and h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t.

The ``torch`` backend uses the C++ kernel of ``selective_scan.cpp`` (compiled once per machine
with ``torch.utils.cpp_extension``; set ZOO_SCAN_CPP=0 to skip it) for fp32/fp64 CPU tensors,
and otherwise the chunked scan below: chunks of ``chunk`` steps, a Hillis-Steele scan inside a
chunk (log2(chunk) vectorised passes, numerically stable: only products of decays <= 1), the
state carried across chunks, and each chunk recomputed in backward (``torch.utils.checkpoint``)
so that no (B, L, D, N) tensor is kept. The same C++ file holds Mamba's causal depthwise
convolution + SiLU in the (B, L, D) layout (``conv_silu``).
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint


def fast_scan(u, delta_raw, A, B, C, D_skip, z, delta_bias, chunk: int = 64):
    """The ``torch`` backend's scan: the C++ kernel on the CPU (fp32/fp64) where it builds, else
    the chunked scan in PyTorch."""
    if u.device.type == "cpu" and u.dtype in (torch.float32, torch.float64) and cpp_available():
        return _CppScan.apply(u, delta_raw, A, B, C, D_skip, z, delta_bias, chunk)
    return chunked_scan(u, delta_raw, A, B, C, D_skip, z, delta_bias, chunk)


def reference_scan(u, delta_raw, A, B, C, D_skip, z, delta_bias):
    """The recurrence as written, one time step per Python iteration."""
    delta = F.softplus(delta_raw + delta_bias)  # (B, L, D)
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])  # (B, D, N)
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, 1) + D_skip * u
    return y * F.silu(z)


# -- chunked scan in PyTorch -------------------------------------------------------------------
def _chunk(h0, u, delta, A, B, C):
    """One chunk: h0 (B, D, N); u, delta (B, c, D); B, C (B, c, N) -> y (B, c, D), h_last."""
    a = torch.exp(delta[..., None] * A)  # (B, c, D, N)
    b = (delta * u)[..., None] * B[:, :, None, :]
    b = torch.cat((b[:, :1] + a[:, :1] * h0[:, None], b[:, 1:]), 1)
    k = 1
    while k < a.shape[1]:  # Hillis-Steele: after the pass for k, b[t] sums the last 2k steps
        b = torch.cat((b[:, :k], b[:, k:] + a[:, k:] * b[:, :-k]), 1)
        a = torch.cat((a[:, :k], a[:, k:] * a[:, :-k]), 1)
        k *= 2
    return (b * C[:, :, None, :]).sum(-1), b[:, -1]


def chunked_scan(u, delta_raw, A, B, C, D_skip, z, delta_bias, chunk: int = 64):
    delta = F.softplus(delta_raw + delta_bias)
    h = u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    # split once (its backward joins the chunks' gradients once; slicing per chunk in the loop
    # made autograd build a zero gradient of the whole sequence for every chunk)
    for uc, dc, Bc, Cc in zip(*(t.split(chunk, 1) for t in (u, delta, B, C)), strict=True):
        part = (uc, dc, A, Bc, Cc)
        if torch.is_grad_enabled():
            y, h = checkpoint(_chunk, h, *part, use_reentrant=False)
        else:
            y, h = _chunk(h, *part)
        ys.append(y)
    return (torch.cat(ys, 1) + D_skip * u) * F.silu(z)


# -- the C++ kernel ------------------------------------------------------------------------------
# -ffast-math, all of it: only with every fast-math flag on does GCC define __FAST_MATH__, under
# which glibc declares its vectorised exp (the scan is much slower without). Its finite-math
# assumption is met by the kernels, which never form an infinity from finite input (see the note
# at the top of selective_scan.cpp); tests compare them with the reference at extreme inputs.
FLAGS = ("-O3", "-ffast-math", "-fopenmp", "-march=native")


def _host_tag() -> str:
    """A short tag of this CPU's model and instruction set, the flags and this checkout: -march=native
    builds for the host, so a build cache shared across machines must keep one build per CPU kind,
    never run another's; and two checkouts (a worktree running a sweep beside the one being edited)
    must not rebuild each other's extension at every import."""
    import hashlib
    import platform

    text = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        text += "".join(line for line in info.splitlines() if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        text += platform.processor()
    text += " ".join(FLAGS) + str(Path(__file__).resolve().parent)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


@functools.cache
def _extension():
    from torch.utils import cpp_extension

    source = Path(__file__).with_name("selective_scan.cpp")
    name = f"zoo_selective_scan_{_host_tag()}"
    build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
    build_dir.mkdir(parents=True, exist_ok=True)
    # PyTorch marks a build in progress with a file named `lock` and waits, forever, while it
    # exists; a build killed midway (a suite timeout, Ctrl-C) leaves it behind and every later
    # import hangs. An OS lock (flock) is released when its holder dies: whoever holds it is the
    # only zoo process building here, so a `lock` file it finds is stale and is removed.
    with open(build_dir / "zoo-build.flock", "w") as guard:
        try:
            import fcntl

            fcntl.flock(guard, fcntl.LOCK_EX)
            (build_dir / "lock").unlink(missing_ok=True)
        except ImportError:  # no flock (Windows): PyTorch's own lock only
            pass
        # -fopenmp: at::parallel_for is header code that runs serially unless OpenMP is on.
        return cpp_extension.load(name=name, sources=[str(source)], extra_cflags=list(FLAGS),
                                  extra_ldflags=["-fopenmp"], build_directory=str(build_dir), verbose=False)


@functools.cache
def cpp_available() -> bool:
    """True when the C++ scan is built (or builds now); warns once and falls back if it cannot."""
    if os.environ.get("ZOO_SCAN_CPP", "1") == "0":
        return False
    try:
        _extension()
        return True
    except Exception as e:  # a missing compiler, ninja or headers: the PyTorch scan still works
        warnings.warn(f"the zoo's C++ selective scan could not be built ({type(e).__name__}: {e}); "
                      "using the chunked PyTorch scan", stacklevel=2)
        return False


class _CppScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta_raw, A, B, C, D_skip, z, delta_bias, chunk):
        args = [t.contiguous() for t in (u, delta_raw, A, B, C, D_skip, z, delta_bias)]
        out, states = _extension().forward(*args, chunk)
        ctx.save_for_backward(*args, states)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, dout):
        *args, states = ctx.saved_tensors
        du, ddelta, dz, dA, dB, dC, dD, dbias = _extension().backward(*args, states, dout.contiguous(), ctx.chunk)
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None


class _CppConvSiLU(torch.autograd.Function):
    """silu(causal depthwise conv1d) in the (B, L, D) layout, by the C++ kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        if x.stride(-1) != 1:
            x = x.contiguous()
        w = weight.reshape(weight.shape[0], -1).contiguous()  # (D, 1, K) -> (D, K)
        b = bias.contiguous() if bias is not None else x.new_zeros(x.shape[-1])
        ctx.save_for_backward(x, w, b)
        ctx.has_bias, ctx.wshape = bias is not None, weight.shape
        return _extension().conv_forward(x, w, b)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, w, b = ctx.saved_tensors
        gx, gw, gb = _extension().conv_backward(x, w, b, g.contiguous())
        return gx, gw.view(ctx.wshape), gb if ctx.has_bias else None


def conv_silu(x, conv: torch.nn.Conv1d):
    """silu(conv(x))[:, :L] for Mamba's causal depthwise ``conv`` (groups = channels, padding
    K - 1); x and the result are (B, L, D). Runs ``conv`` itself."""
    return F.silu(conv(x.transpose(1, 2))[..., : x.shape[1]]).transpose(1, 2)


def fast_conv_silu(x, conv: torch.nn.Conv1d):
    """The same through the C++ kernel on the CPU (fp32/fp64; no transposes to (B, D, L) and
    back), else :func:`conv_silu`."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and cpp_available():
        return _CppConvSiLU.apply(x, conv.weight, conv.bias)
    return conv_silu(x, conv)


# -- mamba-ssm -------------------------------------------------------------------------------------
def mamba_ssm_scan(u, delta_raw, A, B, C, D_skip, z, delta_bias):
    """mamba-ssm's fused CUDA kernel (imported here only: it cannot import on a CPU-only machine).
    A, D_skip and delta_bias come in fp32 (the caller never rounds them to the activations'
    dtype, as upstream computes -exp(A_log.float()))."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731  (B, L, .) -> (B, ., L)
    y = selective_scan_fn(t(u), t(delta_raw), A, t(B), t(C), D_skip, z=t(z),
                          delta_bias=delta_bias, delta_softplus=True)
    return y.transpose(1, 2)


@functools.cache
def has_causal_conv1d() -> bool:
    import importlib.util

    return importlib.util.find_spec("causal_conv1d") is not None


def mamba_ssm_block(m, u):
    """The whole Mamba block through upstream's fused ``mamba_inner_fn`` (in_proj's output in
    the (B, 2 d_inner, L) layout, conv + scan + gate + out_proj in one autograd function); A,
    D and the dt bias in fp32, as upstream."""
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn

    L = u.shape[1]
    xz = (m.in_proj.weight @ u.reshape(-1, u.shape[-1]).t()).view(-1, u.shape[0], L).transpose(0, 1)  # (B, 2Di, L)
    if m.in_proj.bias is not None:
        xz = xz + m.in_proj.bias[:, None].to(xz.dtype)
    return mamba_inner_fn(xz, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight, m.dt_proj.weight,
                          m.out_proj.weight, m.out_proj.bias, -torch.exp(m.A_log.float()), None, None,
                          m.D.float(), delta_bias=m.dt_proj.bias.float(), delta_softplus=True)


def mamba_ssm_step(m, u_t, state):
    """One decode step with upstream's kernels; they update the states in place, so they get
    copies (constant size) and the state given stays valid (the zoo's decode rule)."""
    from causal_conv1d import causal_conv1d_update
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update

    conv, ssm = state["conv"].clone(), state["ssm"].clone()
    x, z = m.in_proj(u_t).chunk(2, dim=-1)  # (B, d_inner)
    x = causal_conv1d_update(x, conv, m.conv1d.weight[:, 0], m.conv1d.bias, "silu")
    delta, Bm, Cm = m.ssm_inputs(x)
    y = selective_state_update(ssm, x, delta, -torch.exp(m.A_log.float()), Bm, Cm, m.D.float(), z=z,
                               dt_bias=m.dt_proj.bias.float(), dt_softplus=True)
    return m.out_proj(y), {"conv": conv, "ssm": ssm}
