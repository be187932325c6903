"""Gated linear attention: the chunkwise form against the recurrence (values and gradients,
float64), stable under strong forgetting, and plain linear attention when nothing is forgotten;
the shared contract tests cover causality, decoding and state reuse."""

import pytest
import torch

import zoo
from zoo.mixers.gla import GatedLinearAttention

torch.manual_seed(0)


@pytest.mark.parametrize("T,chunk,temperature", [(1, 8, 16.0), (29, 8, 16.0), (64, 64, 16.0), (40, 16, 0.05)])
def test_chunkwise_equals_the_recurrence_in_values_and_gradients(T, chunk, temperature):
    """temperature 0.05: gates down to about e^-30 per step, a chunk's decay spanning about e^-800."""
    m = GatedLinearAttention(32, n_heads=2, chunk=chunk, gate_rank=4, gate_temperature=temperature).double()
    x = torch.randn(2, T, 32, dtype=torch.float64)
    q, k, v = (t.detach().requires_grad_() for t in m.project(x))
    log_alpha = m.log_gates(x).detach().requires_grad_()
    w = torch.randn(2, 2, T, 16, dtype=torch.float64)
    results = []
    for fn in (m.attend_torch, m.attend_reference):
        y = fn(q, k, v, log_alpha)
        assert torch.isfinite(y).all()
        results.append((y, torch.autograd.grad((y * w).sum(), (q, k, v, log_alpha))))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_without_forgetting_it_is_causal_linear_attention():
    m = GatedLinearAttention(32, n_heads=2, chunk=8).double()
    q, k, v = torch.randn(3, 2, 2, 20, 16, dtype=torch.float64)
    y = m.attend_torch(q, k, v, torch.zeros_like(q))
    torch.testing.assert_close(y, ((q @ k.transpose(-2, -1)).tril()) @ v)


@pytest.mark.parametrize("name", ["gla", "retnet", "deltanet", "gated_deltanet"])
def test_the_matrix_state_family_decodes_in_constant_space(name):
    """One d_k x d_v matrix per head (zoo.nn.attention.MatrixStateAttention), whatever the context."""
    m = zoo.build_mixer(name, 32, n_heads=2)
    state = m.init_state(3)
    _, after = zoo.decode(m, torch.randn(3, 30, 32), state)
    assert zoo.state_nbytes(after["S"]) == zoo.state_nbytes(state["S"]) == 3 * 2 * 16 * 16 * 4


def test_bad_settings_are_named():
    with pytest.raises(zoo.ZooConfigError, match="gla is causal only"):
        GatedLinearAttention(32, causal=False)
    with pytest.raises(zoo.ZooConfigError, match="gate_temperature > 0"):
        GatedLinearAttention(32, gate_temperature=0)
