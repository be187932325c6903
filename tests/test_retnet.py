"""RetNet's retention: the parallel, chunkwise and recurrent forms agree in values and gradients
(float64); the shared contract tests cover causality, decoding and state reuse."""

import pytest
import torch

import zoo
from zoo.mixers.retnet import RetNet

torch.manual_seed(0)


def recurrent(m: RetNet, q, k, v):
    """The paper's recurrence, written out: S_n = gamma S_{n-1} + k_n^T v_n, y_n = q_n S_n."""
    B, H, T, hd = q.shape
    gamma = torch.exp(m.log_decay).to(q.dtype)[:, None, None]
    S, ys = q.new_zeros(B, H, hd, hd), []
    for t in range(T):
        S = gamma * S + k[:, :, t, :, None] @ v[:, :, t, None, :]
        ys.append((q[:, :, t, None, :] @ S)[:, :, 0])
    return torch.stack(ys, 2)


@pytest.mark.parametrize("T,chunk", [(1, 8), (23, 8), (32, 32), (40, 1), (40, 64)])
def test_three_forms_agree_in_values_and_gradients(T, chunk):
    m = RetNet(32, n_heads=4, chunk=chunk).double()
    q, k, v = (torch.randn(2, 4, T, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    w = torch.randn(2, 4, T, 8, dtype=torch.float64)
    results = []
    for fn in (m.attend_torch, m.attend_reference, lambda *a: recurrent(m, *a)):
        y = fn(q, k, v)
        results.append((y, torch.autograd.grad((y * w).sum(), (q, k, v))))
    for y, grads in results[1:]:
        torch.testing.assert_close(results[0][0], y, rtol=1e-10, atol=1e-10)
        for a, b in zip(results[0][1], grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_heads_forget_at_their_own_rates():
    """gamma_h = 1 - 2^(-5-h): head 0 forgets fastest; the decay reaches the output through
    the parallel form's mask exactly."""
    m = RetNet(64, n_heads=4)
    gammas = torch.exp(m.log_decay)
    torch.testing.assert_close(gammas, 1 - 2.0 ** (-5 - torch.arange(4, dtype=torch.float64)))
    pos = torch.arange(10)
    D = m.decay(pos, pos, torch.float64)
    assert (D.triu(1) == 0).all() and torch.allclose(D[:, 9, 0], gammas**9)


def test_bidirectional_is_refused():
    with pytest.raises(zoo.ZooConfigError, match="retnet is causal only"):
        RetNet(32, causal=False)
