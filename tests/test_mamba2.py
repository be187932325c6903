"""Mamba-2 (SSD): the chunked scan against the recurrence (values and gradients, float64, at
strong decay too), grouped B/C, mamba-ssm's parameter layout, and the CUDA kernel against the
CPU form where CUDA is present; the shared contract tests cover causality, decoding and state
reuse."""

import pytest
import torch

import zoo
from zoo.errors import ZooConfigError
from zoo.mixers.mamba2 import Mamba2

torch.manual_seed(0)


def scan_inputs(m: Mamba2, T: int, dt_scale: float = 1.0):
    B, H, P, N = 2, m.nheads, m.headdim, m.d_state
    x = torch.randn(B, T, H, P, dtype=torch.float64)
    dt = torch.rand(B, T, H, dtype=torch.float64) * dt_scale
    A = -torch.exp(m.A_log.double().detach())
    Bm, Cm = torch.randn(B, T, H, N, dtype=torch.float64), torch.randn(B, T, H, N, dtype=torch.float64)
    return [t.requires_grad_() for t in (x, dt, A, Bm, Cm)]


@pytest.mark.parametrize("T,chunk,dt_scale", [(1, 8, 1.0), (29, 8, 1.0), (64, 64, 1.0), (40, 16, 4.0)])
def test_chunked_scan_equals_the_recurrence_in_values_and_gradients(T, chunk, dt_scale):
    """dt_scale 4 with A up to 16: decays down to e^-64 per step, a chunk's span about e^-1000."""
    m = Mamba2(32, d_state=8, headdim=8, chunk=chunk).double()
    inputs = scan_inputs(m, T, dt_scale)
    w = torch.randn(2, T, m.nheads, m.headdim, dtype=torch.float64)
    results = []
    for fn in (m.scan_chunked, m.scan_reference):
        y = fn(*inputs)
        assert torch.isfinite(y).all()
        results.append((y, torch.autograd.grad((y * w).sum(), inputs)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_whole_block_backends_agree_and_decode_equals_forward(ngroups):
    m = Mamba2(32, d_state=8, headdim=8, ngroups=ngroups, chunk=5).double()
    u = torch.randn(2, 23, 32, dtype=torch.float64)
    ref = m.forward_reference(u)
    torch.testing.assert_close(m.forward_torch(u), ref, rtol=1e-10, atol=1e-10)
    ys, state = zoo.decode(m, u)
    torch.testing.assert_close(ys, ref, rtol=1e-10, atol=1e-10)
    assert state["ssm"].shape == (2, m.nheads, m.headdim, m.d_state)


def test_groups_share_B_and_C():
    """With ngroups 2 the first half of the heads reads group 0's B and C: changing group 1's part
    of the conv output leaves those heads unchanged."""
    m = Mamba2(32, d_state=4, headdim=8, ngroups=2).double()  # 8 heads, 4 per group
    x, Bm, Cm, dt, A = m.ssm_inputs(torch.randn(1, 6, m.conv_dim, dtype=torch.float64),
                                    torch.randn(1, 6, m.nheads, dtype=torch.float64))
    y = m.scan_chunked(x, dt, A, m.per_head(Bm), m.per_head(Cm))
    Bm2 = Bm.clone()
    Bm2[:, :, 1] += 1.0
    y2 = m.scan_chunked(x, dt, A, m.per_head(Bm2), m.per_head(Cm))
    assert torch.equal(y[:, :, :4], y2[:, :, :4]) and not torch.equal(y[:, :, 4:], y2[:, :, 4:])


def test_parameters_follow_mamba_ssm():
    """mamba_ssm.modules.mamba2.Mamba2(64) (d_state 128, headdim 64, expand 2, ngroups 1): in_proj
    2*128 + 2*128 + 2 heads, conv over x, B and C, per-head dt_bias, A_log and D."""
    m = zoo.build_mixer("mamba2", 64)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "in_proj.weight": (2 * 128 + 2 * 128 + 2, 64), "conv1d.weight": (128 + 256, 1, 4), "conv1d.bias": (384,),
        "dt_bias": (2,), "A_log": (2,), "D": (2,), "norm.weight": (128,), "out_proj.weight": (64, 128),
    }
    A = m.A_log.exp()
    assert A.min() >= 1 and A.max() <= 16
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    assert all(getattr(p, "_no_weight_decay", False) for p in (m.dt_bias, m.A_log, m.D))


@pytest.mark.peers
def test_matches_huggingface_mamba2_mixer():
    """Hugging Face's Mamba2Mixer, its pure-PyTorch path (no kernels on a CPU), with our weights:
    ngroups 2 and chunks of another size. It computes A and the gated norm in float32, hence the
    tolerance in float64."""
    mm = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    from transformers import Mamba2Config

    ours = zoo.build_mixer("mamba2", 64, d_state=16, headdim=16, ngroups=2, chunk=16).double()
    cfg = Mamba2Config(hidden_size=64, num_heads=ours.nheads, head_dim=16, state_size=16, expand=2, n_groups=2,
                       conv_kernel=4, chunk_size=32, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5,
                       num_hidden_layers=1)
    peer = mm.Mamba2Mixer(cfg, layer_idx=0).double().eval()
    peer.load_state_dict(ours.state_dict())
    x = torch.randn(2, 50, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), peer(x), rtol=1e-5, atol=1e-6)


def test_mamba2_errors():
    with pytest.raises(ZooConfigError, match="headdim"):
        Mamba2(48, headdim=64)
    with pytest.raises(ZooConfigError, match="ngroups"):
        Mamba2(64, headdim=64, ngroups=3)
    with pytest.raises(ZooConfigError, match="causal"):
        Mamba2(64, causal=False)
    with pytest.raises(ZooConfigError, match="A_init_range"):
        Mamba2(64, A_init_range=(0, 16))


@pytest.mark.gpu
def test_mamba_ssm_kernel_matches_the_torch_backend():
    pytest.importorskip("mamba_ssm")
    ref = zoo.build_mixer("mamba2", 128, backend="torch").cuda()
    fast = zoo.build_mixer("mamba2", 128, backend="mamba_ssm").cuda()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 300, 128, device="cuda")
    torch.testing.assert_close(fast(x), ref(x), rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
def test_weights_load_into_mamba_ssm_mamba2():
    """The same state dict in upstream's module gives the same output (its rmsnorm gate included)."""
    upstream = pytest.importorskip("mamba_ssm.modules.mamba2")
    ours = zoo.build_mixer("mamba2", 128, backend="torch").cuda()
    theirs = upstream.Mamba2(128).cuda()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 300, 128, device="cuda")
    torch.testing.assert_close(theirs(x), ours(x), rtol=2e-3, atol=2e-3)
