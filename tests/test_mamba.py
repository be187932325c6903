"""Mamba: fast scans equal the step-by-step reference; parity with mambapy and Hugging Face;
decoding; state size; the CUDA kernel on GPU."""

from pathlib import Path

import pytest
import torch

import zoo
from zoo.mixers import selective_scan

D = 32


def scan_inputs(L, dtype=torch.float32, Bsz=2, Dc=70, N=5):
    g = torch.Generator().manual_seed(L)
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=dtype) * scale).requires_grad_()
    A = (-torch.rand(Dc, N, generator=g, dtype=dtype) * 4).requires_grad_()
    return [r(Bsz, L, Dc), r(Bsz, L, Dc), A, r(Bsz, L, N), r(Bsz, L, N), r(Dc), r(Bsz, L, Dc), r(Dc)]


FAST = {
    "cpp": lambda *a: selective_scan._CppScan.apply(*a, 16),
    "chunked": lambda *a: selective_scan.chunked_scan(*a, chunk=16),
}


@pytest.mark.parametrize("L", [1, 7, 16, 33, 100])
@pytest.mark.parametrize("impl", ["cpp", "chunked"])
def test_fast_scans_equal_the_reference_fp32(impl, L):
    if impl == "cpp" and not selective_scan.cpp_available():
        pytest.skip("no C++ toolchain here; the chunked scan is the torch backend")
    args = scan_inputs(L)
    ref = selective_scan.reference_scan(*args)
    fast = FAST[impl](*args)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for a, b, name in zip(torch.autograd.grad(fast, args, g), torch.autograd.grad(ref, args, g),
                          ["u", "delta", "A", "B", "C", "D", "z", "bias"], strict=True):
        scale = b.abs().max().item()  # 1e-5 relative to the gradient's scale: sums over B*L reorder
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, msg=f"d{name}")


def test_cpp_kernels_are_finite_where_the_math_is():
    """Under -ffast-math the compiler assumes no inf appears: the kernels must never form one
    from finite input (the textbook sigmoid overflowed at -89 in fp32 and gave NaN)."""
    if not selective_scan.cpp_available():
        pytest.skip("no C++ toolchain here")
    conv = torch.nn.Conv1d(4, 4, 4, groups=4, padding=3)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    x = torch.tensor([-89.0, -100.0, -1000.0, 89.0, 1e30, -1e30, 0.0, -88.0]).repeat(4, 1).t()[None].contiguous()
    fast = selective_scan.fast_conv_silu(x, conv)
    ref = selective_scan.conv_silu(x, conv)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(fast, ref)
    args = [a.detach() for a in scan_inputs(40)]
    for z_value in (-89.0, -1000.0, -1e30):  # the silu(z) gate
        args[6] = torch.full_like(args[6], z_value)
        ref = selective_scan.reference_scan(*args)
        fast = selective_scan._CppScan.apply(*args, 16)
        assert torch.isfinite(ref).all() and torch.isfinite(fast).all(), z_value
        torch.testing.assert_close(fast, ref)


def test_whole_block_at_extreme_inputs_equals_the_reference():
    fast = zoo.build_mixer("mamba", 64, backend="torch")
    ref = zoo.build_mixer("mamba", 64, backend="reference")
    ref.load_state_dict(fast.state_dict())
    x = 50 * torch.randn(2, 48, 64)
    with torch.no_grad():
        y_ref, y_fast = ref(x), fast(x)
    assert torch.isfinite(y_ref).all()
    assert torch.isfinite(y_fast).all(), f"{(~torch.isfinite(y_fast)).sum()} non-finite outputs"
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-4, atol=1e-3 * y_ref.abs().max().item())


def test_build_is_keyed_by_host_and_flags(monkeypatch):
    """-march=native builds for this CPU: the cache name carries the CPU and flags, so a cache
    shared with another kind of machine (or built with other flags) is never loaded here."""
    tag = selective_scan._host_tag()
    assert len(tag) == 10 and tag == selective_scan._host_tag()
    monkeypatch.setattr(selective_scan, "FLAGS", (*selective_scan.FLAGS, "-fno-fast-math"))
    assert selective_scan._host_tag() != tag


def test_a_build_killed_midway_does_not_hang_the_next_import():
    """A build killed midway leaves PyTorch's `lock` file; the next process must not wait on it
    forever (it did: every later mamba case hung until its timeout)."""
    import subprocess
    import sys

    if not selective_scan.cpp_available():
        pytest.skip("no C++ toolchain here")
    from torch.utils import cpp_extension

    name = f"zoo_selective_scan_{selective_scan._host_tag()}"
    lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
    lock.touch()  # what a killed build leaves
    code = "from zoo.mixers import selective_scan; selective_scan._extension(); print('loaded')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "loaded" in out.stdout, out.stderr[-2000:]
    assert not lock.exists()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("L", [1, 3, 17])
def test_cpp_conv_silu_equals_conv1d(bias, L):
    if not selective_scan.cpp_available():
        pytest.skip("no C++ toolchain here; Mamba runs nn.Conv1d")
    conv = torch.nn.Conv1d(10, 10, 4, groups=10, padding=3, bias=bias).double()
    xz = torch.randn(2, L, 20, dtype=torch.float64, requires_grad=True)  # x: a strided half, as in Mamba
    fast = selective_scan.fast_conv_silu(xz[..., :10], conv)
    ref = selective_scan.conv_silu(xz[..., :10], conv)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    params = [xz, *conv.parameters()]
    for a, b in zip(torch.autograd.grad(fast, params, g), torch.autograd.grad(ref, params, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    fn = lambda xz, w, *b: selective_scan._CppConvSiLU.apply(xz[..., 10:], w, *(b or [None]))  # noqa: E731
    assert torch.autograd.gradcheck(fn, tuple(params))


def test_torch_backend_falls_back_to_the_chunked_scan(monkeypatch):
    monkeypatch.setattr(selective_scan, "cpp_available", lambda: False)
    ref = zoo.build_mixer("mamba", D, d_state=4, backend="reference").double()
    fast = zoo.build_mixer("mamba", D, d_state=4, backend="torch", chunk=8).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 29, D, dtype=torch.float64)
    torch.testing.assert_close(fast(x), ref(x))
    bf = zoo.build_mixer("mamba", D, d_state=4).to(torch.bfloat16)  # no C++ kernel for bf16
    assert torch.isfinite(bf(x.to(torch.bfloat16))).all()


def test_parameters_follow_mamba_ssm():
    m = zoo.build_mixer("mamba", 64)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (256, 64), "conv1d.weight": (128, 1, 4), "conv1d.bias": (128,),
        "x_proj.weight": (4 + 32, 128), "dt_proj.weight": (128, 4), "dt_proj.bias": (128,),
        "A_log": (128, 16), "D": (128,), "out_proj.weight": (64, 128),
    }
    torch.testing.assert_close(m.A_log.exp()[0], torch.arange(1.0, 17.0))  # S4D-real
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6


@pytest.mark.peers
def test_matches_mambapy():
    mamba = pytest.importorskip("mambapy.mamba")
    peer = mamba.MambaBlock(mamba.MambaConfig(d_model=D, n_layers=1, d_state=8, expand_factor=2)).double()
    ours = zoo.build_mixer("mamba", D, d_state=8).double()
    ours.load_state_dict(peer.state_dict())
    x = torch.randn(2, 50, D, dtype=torch.float64)
    torch.testing.assert_close(ours(x), peer(x))


@pytest.mark.peers
def test_matches_huggingface_mamba_mixer():
    mm = pytest.importorskip("transformers.models.mamba.modeling_mamba")
    from transformers import MambaConfig
    cfg = MambaConfig(hidden_size=D, state_size=4, expand=2, conv_kernel=4, time_step_rank=2,
                      use_bias=False, use_conv_bias=True)
    peer = mm.MambaMixer(cfg, layer_idx=0).double()
    ours = zoo.build_mixer("mamba", D, d_state=4, dt_rank=2).double()
    ours.load_state_dict(peer.state_dict())
    x = torch.randn(2, 12, D, dtype=torch.float64)
    torch.testing.assert_close(ours(x), peer(x), rtol=1e-8, atol=1e-9)


def test_decode_state_is_constant_and_equals_forward():
    m = zoo.build_mixer("mamba", D, d_state=4).double().eval()
    x = torch.randn(2, 40, D, dtype=torch.float64)
    size = zoo.state_nbytes(m.init_state(2))
    assert size == 2 * m.d_inner * (4 + 4) * 8  # conv (d_conv) + ssm (d_state) per channel
    with torch.no_grad():
        ys, state = zoo.decode(m, x)
        torch.testing.assert_close(ys, m(x))
    assert zoo.state_nbytes(state) == size


def test_hybrid_model_decodes():
    model = zoo.build_model({"mixer": ["mamba", "softmax"], "n_layers": 4, "d_model": D,
                             "mixer_args": {"softmax": {"n_heads": 2}, "d_state": 4}}).double().eval()
    tokens = torch.randint(0, 256, (2, 15))
    with torch.no_grad():
        first, state = model.decode(tokens[:, :6])
        rest, _ = model.decode(tokens[:, 6:], state)  # decoding resumes from a returned state
        torch.testing.assert_close(torch.cat((first, rest), 1), model(tokens))


def test_mamba_errors():
    with pytest.raises(zoo.ZooConfigError, match=r"'mamba' is causal only"):
        zoo.build_mixer("mamba", D, causal=False)
    with pytest.raises(zoo.ZooConfigError, match=r"mamba needs d_state.*got d_state=0"):
        zoo.build_mixer("mamba", D, d_state=0)
    with pytest.raises(zoo.ZooConfigError, match=r"'mamba' cannot use position 'rope'"):
        zoo.build_mixer("mamba", D, position="rope")
    try:
        import mamba_ssm  # noqa: F401
    except ImportError:
        with pytest.raises(zoo.ZooConfigError, match=r"needs the package 'mamba_ssm' \(pip install 'zoo\[gpu\]'\)"):
            zoo.build_mixer("mamba", D, backend="mamba_ssm")


def cuda_pair():
    """The mamba_ssm backend and the torch backend on CUDA, sharing weights."""
    pytest.importorskip("mamba_ssm")
    ref = zoo.build_mixer("mamba", 64, backend="torch").cuda()
    fast = zoo.build_mixer("mamba", 64, backend="mamba_ssm").cuda()
    fast.load_state_dict(ref.state_dict())
    return fast, ref


@pytest.mark.gpu
def test_mamba_ssm_backend_matches_torch_backend():
    fast, ref = cuda_pair()
    x = torch.randn(2, 300, 64, device="cuda")
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_mamba_ssm_decoding_equals_forward_and_keeps_its_input_state():
    pytest.importorskip("mamba_ssm")
    pytest.importorskip("causal_conv1d")
    m = zoo.build_mixer("mamba", 64, backend="mamba_ssm").cuda().eval()
    x = torch.randn(2, 40, 64, device="cuda")
    with torch.no_grad():
        full = m(x)
        ys, state = zoo.decode(m, x[:, :20])
        before = {k: v.clone() for k, v in state.items()}
        y1, _ = m.step(x[:, 20], state)
        assert all(torch.equal(state[k], before[k]) for k in state)  # upstream updates in place; we copy
        rest, _ = zoo.decode(m, x[:, 20:], state)
    torch.testing.assert_close(torch.cat((ys, rest), 1), full, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y1, rest[:, 0])


@pytest.mark.gpu
def test_mamba_ssm_under_bf16_autocast_keeps_A_in_fp32():
    """Upstream computes -exp(A_log.float()): rounding A_log to bf16 first moves A by up to 0.4 %."""
    m, ref = cuda_pair()
    with torch.no_grad():
        m.A_log.add_(0.003)  # values that bf16 cannot hold exactly
        ref.A_log.copy_(m.A_log)
    x = torch.randn(2, 256, 64, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fast = m(x).float()
    with torch.no_grad():
        exact = ref(x)
    assert (fast - exact).abs().max() < 0.05 * exact.abs().max()
