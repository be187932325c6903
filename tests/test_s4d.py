"""S4D: the chunked form against the paper's recurrence and its convolution kernel, time
invariance, and the decode state (the shared contract tests cover causality and decoding)."""

import pytest
import torch

import zoo
from zoo.mixers.s4d import S4D

torch.manual_seed(0)


def direct_convolution(m: S4D, u: torch.Tensor) -> torch.Tensor:
    """y_t = sum_{s <= t} K_{t-s} u_s with K_l = 2 Re(sum_n C'_n dA_n^l), as a dense (T, T) product."""
    T = u.shape[1]
    dtA, C = m.discrete(u.dtype)
    K = 2 * torch.einsum("hm,hml->hl", C, m.powers(dtA, T)).real  # (H, T)
    lag = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    toeplitz = torch.where(lag >= 0, K[:, lag.clamp(min=0)], 0.0)  # (H, T, T)
    return torch.einsum("hts,bsh->bth", toeplitz, u)


@pytest.mark.parametrize("T,chunk", [(1, 4), (29, 8), (64, 64), (70, 16)])
def test_chunked_equals_the_recurrence_and_the_kernel_in_values_and_gradients(T, chunk):
    m = S4D(12, d_state=8, chunk=chunk).double()
    with torch.no_grad():  # spread the time scales so that both fast and slow modes are exercised
        m.log_dt.uniform_(-5, 0)
    u = torch.randn(3, T, 12, dtype=torch.float64, requires_grad=True)
    outs = {}
    for name, fn in (("torch", m.convolve_torch), ("reference", m.convolve_reference),
                     ("kernel", lambda x: direct_convolution(m, x))):
        y = fn(u)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(),
                                    [u, m.log_dt, m.C, m.log_A_real, m.A_imag])
        outs[name] = (y, grads)
    for name in ("reference", "kernel"):
        torch.testing.assert_close(outs["torch"][0], outs[name][0], rtol=1e-10, atol=1e-10)
        for a, b in zip(outs["torch"][1], outs[name][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


def test_the_layer_is_linear_and_time_invariant_before_its_activation():
    """What makes S4D the zoo's LTI baseline (and Mamba not): the convolution is linear in its
    input and commutes with a shift in time."""
    m = S4D(8, d_state=8, chunk=8).double()
    u1, u2 = torch.randn(2, 2, 30, 8, dtype=torch.float64)
    torch.testing.assert_close(m.convolve(2 * u1 - 3 * u2), 2 * m.convolve(u1) - 3 * m.convolve(u2))
    shifted = torch.cat((torch.zeros(2, 5, 8, dtype=torch.float64), u1), 1)
    torch.testing.assert_close(m.convolve(shifted)[:, 5:], m.convolve(u1))


def test_modes_decay_and_the_state_size_is_constant():
    m = S4D(16, d_state=32)
    dtA, _ = m.discrete(torch.float32)
    assert (torch.exp(dtA).abs() < 1).all()  # a stable system: every mode decays
    state = m.init_state(2)
    assert zoo.state_nbytes(state) == 2 * 16 * 16 * 8  # (B, d_model, d_state / 2) complex64
    _, after = zoo.decode(m, torch.randn(2, 50, 16), state)
    assert zoo.state_nbytes(after) == zoo.state_nbytes(state)


def test_bad_sizes_are_named():
    with pytest.raises(zoo.ZooConfigError, match="even d_state"):
        S4D(8, d_state=3)
    with pytest.raises(zoo.ZooConfigError, match="causal only"):
        S4D(8, causal=False)


def test_decoding_keeps_its_coefficients_until_a_parameter_changes():
    """Without autograd the step reuses exp(dt A) and C'; an in-place parameter update (as an
    optimiser step or load_state_dict makes) is seen at the next step, and with autograd the
    step still sends gradients to the parameters."""
    m = zoo.build_mixer("s4d", 16, d_state=8, chunk=4).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        ys, _ = zoo.decode(m, x)
        torch.testing.assert_close(ys, m(x))
        m.log_dt.add_(0.5)  # in place, as an optimiser step
        ys2, _ = zoo.decode(m, x)
        torch.testing.assert_close(ys2, m(x))
        assert not torch.allclose(ys, ys2)
    y, _ = m.step(x[:, 0], m.init_state(2))
    y.sum().backward()
    assert m.log_dt.grad is not None and m.log_dt.grad.abs().sum() > 0
