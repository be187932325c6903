"""Each mixer's FLOP formula against FlopCounterMode on the CPU torch backend (with the CPU
attention kernel's formula registered by zoo.flops), at lengths that are and are not
multiples of the chunks and blocks, causal and bidirectional; the parts FlopCounterMode cannot
see (depthwise convs and scans run by C++ kernels) are named and added by hand."""

import pytest
import torch

import zoo
from zoo.measure import count_flops, flops


def counted(m, B, T, d):
    x = torch.randn(B, T, d)
    return count_flops(lambda: m(x))


CASES = [
    ("softmax", {"causal": True}), ("softmax", {"causal": False, "n_heads": 2}),
    ("window", {"causal": True, "window": 16, "block": 8, "global_tokens": [0, 5]}),
    ("window", {"causal": False, "window": 7, "dilation": 2, "global_every": 9}),
    ("bigbird", {"causal": True, "window": 8, "block": 4, "random_blocks": 2}),
    ("linear", {"causal": True, "chunk": 16}), ("linear", {"causal": False}),
    ("linear_conv", {"causal": True, "chunk": 16}), ("linear_conv", {"causal": False, "short_conv": 3}),
    ("lsh", {"causal": True, "n_heads": 2, "bucket_size": 16, "n_hashes": 2}), ("lsh", {"causal": False}),
    ("retnet", {"chunk": 16}), ("gla", {"chunk": 16}), ("retnet", {"chunk": 16, "short_conv": 4}),
    ("gla", {"chunk": 16, "short_conv": 3}), ("linformer", {"causal": False, "max_len": 64}),
    ("mlp", {}), ("swiglu", {}), ("moe", {"n_experts": 4, "top_k": 2}), ("moe", {"expert": "mlp", "top_k": 1}),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("T", [1, 37, 64])
def test_formula_equals_flop_counter(name, kw, T):
    m = zoo.build_mixer(name, 64, **kw)
    assert flops(m, 2, T) == counted(m, 2, T, 64)


@pytest.mark.parametrize("T", [1, 37, 64])
def test_mamba_formulas_add_what_the_counter_cannot_see(T):
    """The counter sees the projections only: the conv and the scan run in C++ (or as
    elementwise products)."""
    m = zoo.build_mixer("mamba", 64, d_state=8)
    assert flops(m, 2, T) == counted(m, 2, T, 64) + 2 * 2 * T * m.d_inner * m.d_conv + m.scan_flops(2, T)
    m2 = zoo.build_mixer("mamba2", 64, d_state=16, headdim=16, chunk=16)
    assert flops(m2, 2, T) == counted(m2, 2, T, 64) + 2 * 2 * T * m2.conv_dim * m2.d_conv


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("T", [1, 37, 64])
def test_deltanet_formula_adds_the_triangular_solve(gated, T):
    """The counter sees every product of the WY form but not ``solve_triangular``."""
    m = zoo.build_mixer("deltanet", 64, gated=gated, n_heads=2, chunk=16)
    assert flops(m, 2, T) == counted(m, 2, T, 64) + m.solve_flops(2, T)


@pytest.mark.parametrize("T", [2, 37, 64])
def test_s4d_formula_counts_complex_products_as_real_flops(T):
    """(Not at length 1: there the einsums contract over a dimension of size 1, which torch runs
    as elementwise products that FlopCounterMode does not count; the formula still does.)"""
    m = zoo.build_mixer("s4d", 64, d_state=8, chunk=16)
    assert flops(m, 2, T) == counted(m, 2, T, 64) + m.complex_flops(2, T)


def test_attention_flops_grow_as_the_algorithm_says():
    """softmax above window at every length >= 1024 (the reference report's check), softmax
    quadratic, window linear once past its window."""
    sm, w = zoo.build_mixer("softmax", 256), zoo.build_mixer("window", 256)
    for T in (1024, 2048, 4096, 16384):
        assert flops(sm, 1, T) > flops(w, 1, T)
    core = [sm.attend_flops(1, T) for T in (4096, 8192)]
    assert core[1] == 4 * core[0]
    wc = [w.attend_flops(1, T) for T in (4096, 8192)]
    assert abs(wc[1] / wc[0] - 2) < 0.01


def test_a_mixer_without_a_formula_is_not_counted():
    class Mine(torch.nn.Module):
        def forward(self, x):
            return x

    assert flops(Mine(), 1, 8) is None
