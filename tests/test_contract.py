"""The mixer contract, checked for every sequence mixer in the registry (new entries join here)."""

import pytest
import torch
from conftest import D_MODEL, build_tiny, sequence_cases

from zoo.registry import default_registry

CASES = sequence_cases()
T = 37  # not a multiple of any block size, on purpose


@pytest.mark.parametrize("name,causal,position", CASES)
def test_shape_dtype_finite(name, causal, position):
    m = build_tiny(name, causal=causal, position=position)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, T, D_MODEL, dtype=dtype)
        y = m.to(dtype)(x)
        assert y.shape == x.shape and y.dtype == dtype
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("name,causal,position", CASES)
def test_causality_gradient(name, causal, position):
    """Causal: d y_t / d x_s == 0 exactly for every s > t. Bidirectional: the future is seen."""
    m = build_tiny(name, causal=causal, position=position).double()
    x = torch.randn(1, T, D_MODEL, dtype=torch.float64, requires_grad=True)
    y = m(x)
    for t in (0, 5, T // 2, T - 2):
        (g,) = torch.autograd.grad(y[0, t].sum(), x, retain_graph=True)
        assert g[0, : t + 1].abs().max() > 0, f"output {t} ignores the past and present"
        if causal:
            future = g[0, t + 1 :].abs().max().item()
            assert future == 0.0, f"output {t} depends on a later input (|grad| {future})"
    if not causal:  # the first half of the outputs sees some of the second half's inputs
        (g,) = torch.autograd.grad(y[0, : T // 2].sum(), x)
        assert g[0, T // 2 :].abs().max() > 0, "bidirectional outputs ignore the future"


@pytest.mark.parametrize("name,causal,position", CASES)
def test_batch_independence(name, causal, position):
    m = build_tiny(name, causal=causal, position=position).double()
    x = torch.randn(3, T, D_MODEL, dtype=torch.float64)
    together = m(x)
    alone = torch.cat([m(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-9, atol=1e-9)


DECODE = [c for c in CASES if default_registry().mixer(c.values[0]).decode and c.values[1]]


@pytest.mark.parametrize("name,causal,position", DECODE)
def test_step_equals_forward(name, causal, position):
    m = build_tiny(name, causal=causal, position=position).double()
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64)
    full = m(x)
    state = m.init_state(2, dtype=torch.float64)
    ys = []
    for t in range(T):
        y, state = m.step(x[:, t], state)
        ys.append(y)
    torch.testing.assert_close(torch.stack(ys, 1), full, rtol=1e-9, atol=1e-9)


def _backend_cases():
    out = []
    for c in CASES:
        e = default_registry().mixer(c.values[0])
        for b, why in e.available_backends("cpu").items():
            if b != "reference" and not why:
                out.append(pytest.param(*c.values, b, id=f"{c.id}-{b}"))
    return out


@pytest.mark.parametrize("name,causal,position,backend", _backend_cases())
def test_backend_equals_reference(name, causal, position, backend):
    ref = build_tiny(name, causal=causal, position=position, backend="reference")
    fast = build_tiny(name, causal=causal, position=position, backend=backend)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, T, D_MODEL, requires_grad=True)
    y_ref, y_fast = ref(x), fast(x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y_ref)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    (gx_fast,) = torch.autograd.grad(y_fast, x, g)
    torch.testing.assert_close(gx_fast, gx_ref, rtol=1e-4, atol=1e-5)
