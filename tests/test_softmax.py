"""Softmax attention: backends agree; RoPE and ALiBi match independent formulations."""

import math

import pytest
import torch

import zoo
from zoo.nn.positions import Rotary, alibi_slopes


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("position", ["none", "rope", "alibi"])
def test_backends_agree_fp32(causal, position):
    ref = zoo.build_mixer("softmax", 64, n_heads=4, causal=causal, position=position, backend="reference")
    fast = zoo.build_mixer("softmax", 64, n_heads=4, causal=causal, position=position, backend="torch")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 128, 64)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-5, atol=1e-5)


def test_reference_is_textbook_attention():
    """One head, no position: softmax(q k^T / sqrt(d) + causal mask) v, written out by hand."""
    m = zoo.build_mixer("softmax", 8, n_heads=1, causal=True, backend="reference")
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    m = m.double()
    with torch.no_grad():
        q, k, v = (x @ w.T for w in m.qkv.weight.chunk(3))
    out = torch.zeros(5, 8, dtype=torch.float64)
    for i in range(5):
        s = torch.stack([q[0, i] @ k[0, j] / math.sqrt(8) for j in range(i + 1)])
        p = torch.softmax(s, 0)
        out[i] = sum(p[j] * v[0, j] for j in range(i + 1))
    torch.testing.assert_close(m(x)[0], out @ m.out.weight.T)


def test_rope_matches_complex_rotation():
    hd, T = 8, 6
    x = torch.randn(1, 1, T, hd, dtype=torch.float64)
    got = Rotary(hd).double()(x, start=3)
    theta = 1e4 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2 :])  # pairs (i, i + hd/2)
    pos = torch.arange(3, 3 + T, dtype=torch.float64)[:, None]
    rz = z * torch.exp(1j * pos * theta)
    torch.testing.assert_close(got, torch.cat((rz.real, rz.imag), -1).to(got.dtype))


def test_rope_scores_are_relative():
    """<R(p) q, R(p') k> depends on p - p' only."""
    rot = Rotary(16).double()
    q, k = torch.randn(2, 1, 1, 1, 16, dtype=torch.float64)
    def score(p, pk):
        return (rot(q, p) * rot(k, pk)).sum()
    torch.testing.assert_close(score(5, 2), score(105, 102))


def test_alibi_slopes_follow_the_paper():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 12 heads: the 8-head slopes, then every other slope of the 16-head set.
    sixteen = [2.0 ** (-(i + 1) / 2) for i in range(16)]
    expected = [2.0 ** -(i + 1) for i in range(8)] + sixteen[0::2][:4]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected))


def test_kv_cache_grows_past_its_capacity():
    m = zoo.build_mixer("softmax", 32, n_heads=2, causal=True, position="rope").double().eval()
    x = torch.randn(1, 70, 32, dtype=torch.float64)
    ys, state = zoo.decode(m, x, m.init_state(1, capacity=4))
    torch.testing.assert_close(ys, m(x))
    assert zoo.state_nbytes(state) >= 2 * 70 * 32 * 8  # keys and values of 70 positions


def test_missing_backend_package_is_a_clear_error():
    try:
        import xformers  # noqa: F401
        pytest.skip("xformers is installed")
    except ImportError:
        pass
    with pytest.raises(zoo.ZooConfigError, match=r"needs the package 'xformers' \(pip install 'zoo\[gpu\]'\)"):
        zoo.build_mixer("softmax", 32, backend="xformers")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "xformers"])
@pytest.mark.parametrize("position", ["none", "alibi"])
def test_cuda_backends_match_reference(backend, position):
    if backend == "xformers":
        pytest.importorskip("xformers")
    ref = zoo.build_mixer("softmax", 64, n_heads=4, position=position, backend="reference").cuda()
    fast = zoo.build_mixer("softmax", 64, n_heads=4, position=position, backend=backend).cuda()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 100, 64, device="cuda")
    torch.testing.assert_close(fast(x), ref(x), rtol=2e-3, atol=2e-3)  # TF32 / kernel reorderings
