"""The mixer contract, checked for every sequence mixer in the registry (new entries join here)."""

import pytest
import torch
from conftest import D_MODEL, build_tiny, sequence_cases

import zoo
from zoo.contract import SequenceMixer, decode
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


def _strict(name):
    return default_registry().mixer(name).strictly_causal


STRICT = [c for c in CASES if c.values[1] and _strict(c.values[0])]
LEAKY = [c for c in CASES if c.values[1] and not _strict(c.values[0])]


@pytest.mark.parametrize("name,causal,position", STRICT)
def test_causality_values(name, causal, position):
    """Causal on values, not only gradients: changing only inputs after t leaves every output
    up to t bit-identical. Catches leaks that carry no gradient (hashing, sorting, routing) and
    leaks that cancel in exact arithmetic but not in floating point (a prefix sum minus a part)."""
    m = build_tiny(name, causal=True, position=position).double()
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64)
    y = m(x)
    for t in (0, 3, 7, 15, T // 2, T - 2):
        for scale in (1.0, 1e4):  # an ordinary change and a spike (cancellation shows at scale)
            x2 = x.clone()
            x2[:, t + 1 :] = scale * torch.randn_like(x2[:, t + 1 :])
            y2 = m(x2)
            diff = (y2[:, : t + 1] - y[:, : t + 1]).abs().max().item()
            assert torch.equal(y2[:, : t + 1], y[:, : t + 1]), \
                f"changing inputs after {t} (x{scale:g}) changed outputs <= {t} by {diff:.3g}"


@pytest.mark.parametrize("name,causal,position", LEAKY)
def test_leaky_causal_mixers_say_so_and_are_refused(name, causal, position):
    """A mixer whose causal mode masks the future but whose outputs still depend on it (as
    published) says so in the registry, on the instance, and is refused in a causal model
    unless the config asks for it; the leak is real (else the mark would be a lie)."""
    m = build_tiny(name, causal=True, position=position).double()
    assert m.causal_leak, f"{name} is registered as not strictly causal but its instance does not say why"
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64)
    x2 = x.clone()
    x2[:, T // 2 :] = torch.randn_like(x2[:, T // 2 :])
    assert not torch.equal(m(x)[:, : T // 2], m(x2)[:, : T // 2]), f"{name} is causal on values after all"
    e = default_registry().mixer(name)
    cfg = {"mixer": name, "d_model": D_MODEL, "n_layers": 1, "mixer_args": dict(e.tiny), "position": position}
    with pytest.raises(zoo.ZooConfigError, match=rf"{name}.*not strictly causal.*allow_causal_leak"):
        zoo.build_model(cfg)
    zoo.build_model({**cfg, "allow_causal_leak": True})


@pytest.mark.parametrize("name,causal,position", STRICT)
def test_strict_mixers_report_no_leak(name, causal, position):
    assert getattr(build_tiny(name, causal=True, position=position), "causal_leak", None) is None


@pytest.mark.parametrize("name,causal,position", CASES)
def test_empty_inputs(name, causal, position):
    """One behaviour for empty inputs everywhere: length 0 or batch 0 gives an empty output of
    the same shape (and a gradient of zeros), never an exception."""
    e = default_registry().mixer(name)
    backends = [b for b, why in e.available_backends("cpu").items() if not why]
    for backend in backends if issubclass(e.cls, SequenceMixer) else [None]:  # a user mixer may have none
        m = build_tiny(name, causal=causal, position=position, **({"backend": backend} if backend else {}))
        for shape in ((2, 0, D_MODEL), (0, T, D_MODEL), (0, 0, D_MODEL)):
            x = torch.randn(*shape, requires_grad=True)
            y = m(x)
            assert y.shape == x.shape, f"{backend} {shape}: got {tuple(y.shape)}"
            y.sum().backward()
            assert x.grad is not None and x.grad.shape == x.shape


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
    ys, _ = decode(m, x)
    torch.testing.assert_close(ys, m(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name,causal,position", DECODE)
def test_state_reuse(name, causal, position):
    """The one rule for decode states: ``step`` never changes what its input state means. A
    state stepped twice (beam search, speculative decoding, a retry) gives two independent
    branches, each equal to the forward of its own sequence, and the first is not corrupted by
    the second; stepping the same state a third time repeats the first result exactly."""
    m = build_tiny(name, causal=causal, position=position).double()
    prefix = torch.randn(2, 13, D_MODEL, dtype=torch.float64)
    a, b = (torch.randn(2, T - 13, D_MODEL, dtype=torch.float64) for _ in range(2))
    _, s = decode(m, prefix)
    ya0, sa = m.step(a[:, 0], s)
    yb0, sb = m.step(b[:, 0], s)  # the same state again, another token
    ya0_again, _ = m.step(a[:, 0], s)
    torch.testing.assert_close(ya0_again, ya0, rtol=0, atol=0)
    ya, _ = decode(m, a[:, 1:], sa)
    yb, _ = decode(m, b[:, 1:], sb)
    full_a, full_b = m(torch.cat((prefix, a), 1)), m(torch.cat((prefix, b), 1))
    torch.testing.assert_close(torch.cat((ya0[:, None], ya), 1), full_a[:, 13:], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(torch.cat((yb0[:, None], yb), 1), full_b[:, 13:], rtol=1e-9, atol=1e-9)


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


@pytest.mark.parametrize("name,kwargs,message", [
    ("softmax", {"n_heads": -1}, r"needs n_heads to be integers >= 1; got n_heads=-1"),
    ("softmax", {"head_dim": 0}, r"needs head_dim to be integers >= 1; got head_dim=0"),
    ("linear", {"chunk": 0}, r"linear attention needs chunk to be integers >= 1; got chunk=0"),
    ("mlp", {"hidden": -1}, r"mlp needs hidden to be integers >= 0; got hidden=-1"),
    ("swiglu", {"hidden": -1}, r"swiglu needs hidden to be integers >= 0; got hidden=-1"),
    ("moe", {"hidden": -1}, r"moe needs d_model >= 1, n_experts >= 1 and hidden >= 0"),
    ("window", {"window": 0}, r"window needs window >= 1"),
    ("mamba", {"d_state": 0}, r"mamba needs d_state"),
])
def test_degenerate_sizes_are_configuration_errors(name, kwargs, message):
    with pytest.raises(zoo.ZooConfigError, match=message):
        zoo.build_mixer(name, D_MODEL, **kwargs)


@pytest.mark.parametrize("name", ["softmax", "window", "linear", "lsh", "mamba", "mlp", "swiglu"])
def test_negative_d_model_is_a_configuration_error(name):
    with pytest.raises(zoo.ZooConfigError, match=r"d_model"):
        zoo.build_mixer(name, -4)


# every mixer of the linear-attention family takes the short convolution; each here with the
# other setting than its registry entry (which the tests above cover)
CONV_VARIANTS = [("linear", 3), ("gla", 3), ("retnet", 2), ("deltanet", 0), ("gated_deltanet", 0)]


@pytest.mark.parametrize("name,k", CONV_VARIANTS)
def test_short_conv_either_way_keeps_the_contract(name, k):
    """With and without the short convolution: step equals forward, a state stepped twice
    branches, the past is bit-identical when only the future changes, and the fast backend
    equals the reference."""
    m = build_tiny(name, short_conv=k).double()
    assert m.short_conv == k and hasattr(m, "conv") == bool(k)
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64)
    y = m(x)
    ys, s = decode(m, x[:, :20])
    torch.testing.assert_close(ys, y[:, :20], rtol=1e-9, atol=1e-9)
    ya, _ = m.step(x[:, 20], s)
    m.step(-x[:, 20], s)  # another branch from the same state
    ya_again, _ = m.step(x[:, 20], s)
    torch.testing.assert_close(ya_again, ya, rtol=0, atol=0)
    torch.testing.assert_close(ya, y[:, 20], rtol=1e-9, atol=1e-9)
    for t in (0, 2, 15, T - 2):
        x2 = x.clone()
        x2[:, t + 1 :] = 1e4 * torch.randn_like(x2[:, t + 1 :])
        assert torch.equal(m(x2)[:, : t + 1], y[:, : t + 1]), f"changing inputs after {t} changed the past"
    ref = build_tiny(name, short_conv=k, backend="reference").double()
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(ref(x), y, rtol=1e-9, atol=1e-9)


def test_short_conv_is_refused_where_it_has_no_meaning():
    with pytest.raises(zoo.ZooConfigError, match=r"sequence mixer 'softmax': unknown hyper-parameter 'short_conv'"):
        zoo.build_mixer("softmax", D_MODEL, short_conv=4)
    with pytest.raises(zoo.ZooConfigError, match=r"needs short_conv to be integers >= 0; got short_conv=-1"):
        zoo.build_mixer("gla", D_MODEL, short_conv=-1)
