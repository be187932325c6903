"""DeltaNet and Gated DeltaNet: the chunkwise (WY) form against the recurrence (values and
gradients, float64, strong forgetting included) and the delta rule's defining property; the
shared contract tests cover causality, decoding and state reuse for both registry entries."""

import pytest
import torch

import zoo
from zoo.mixers.deltanet import DeltaNet

torch.manual_seed(0)


@pytest.mark.parametrize("T,chunk,decay", [(1, 8, 0.0), (29, 8, 0.0), (40, 16, 0.3), (64, 64, 5.0), (33, 1, 0.3)])
def test_chunkwise_equals_the_recurrence_in_values_and_gradients(T, chunk, decay):
    """decay: the scale of -log alpha per step (5: e^-5 per step, e^-320 across a chunk)."""
    m = DeltaNet(32, n_heads=2, chunk=chunk).double()
    q, k = (torch.nn.functional.normalize(torch.randn(2, 2, T, 16, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(2, 2, T, 16, dtype=torch.float64)
    beta = torch.rand(2, 2, T, dtype=torch.float64)
    log_alpha = -decay * torch.rand(2, 2, T, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v, beta, log_alpha)]
    w = torch.randn(2, 2, T, 16, dtype=torch.float64)
    results = []
    for fn in (m.attend_torch, m.attend_reference):
        y = fn(*inputs)
        results.append((y, torch.autograd.grad((y * w).sum(), inputs)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-9, atol=1e-9)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_a_full_strength_write_replaces_the_value_for_its_key():
    """The delta rule: writing (k, v) with beta 1 makes the state return v for k, whatever it held
    for k before (linear attention would return the sum of both values)."""
    S = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(1, 1, 8, dtype=torch.float64), dim=-1)
    v = torch.randn(1, 1, 8, dtype=torch.float64)
    S = DeltaNet.update(S, k, v, torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64))
    torch.testing.assert_close((k[..., None, :] @ S)[..., 0, :], v)


def test_gated_variant_forgets_and_has_its_own_parameters():
    plain, gated = zoo.build_mixer("deltanet", 32), zoo.build_mixer("gated_deltanet", 32)
    assert not hasattr(plain, "A_log") and gated.A_log._no_weight_decay
    _, log_alpha = gated.coefficients(torch.randn(2, 5, 32))
    assert (log_alpha < 0).all()
    state = gated.init_state(2)
    _, after = zoo.decode(gated, torch.randn(2, 20, 32), state)
    assert zoo.state_nbytes(after["S"]) == zoo.state_nbytes(state["S"])


def test_bidirectional_is_refused():
    with pytest.raises(zoo.ZooConfigError, match="deltanet is causal only"):
        DeltaNet(32, causal=False)
