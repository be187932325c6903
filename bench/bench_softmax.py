"""Softmax attend core vs raw SDPA vs the textbook formulation (fp32, B=1, H=8, hd=64, causal).

    pytest bench/bench_softmax.py --benchmark-only       # pytest-benchmark timings
    python bench/bench_softmax.py                        # side-by-side ratios, as in docs/softmax.md
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.measure import bench_parser, compare_times, parse_bench_args, ratio, saved_tensor_bytes

H, HD = 8, 64


def textbook(q, k, v):
    T = q.shape[-2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


def candidates(T: int) -> dict:
    """name -> attend(q, k, v) for one length."""
    zoo_softmax = zoo.build_mixer("softmax", H * HD, n_heads=H, causal=True)
    return {
        "zoo": zoo_softmax.attend,
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "textbook": textbook,
    }


def inputs(T: int):
    return [torch.randn(1, H, T, HD, requires_grad=True) for _ in range(3)]


def fwd_bwd(attend, qkv):
    def run():
        attend(*qkv).sum().backward()
    return run


@pytest.mark.parametrize("T", [1024, 4096])
@pytest.mark.parametrize("name", ["zoo", "sdpa", "textbook"])
def test_attend_forward_backward(benchmark, name, T):
    if name == "textbook" and T > 1024:
        pytest.skip("the textbook version is only timed at 1024 (quadratic memory)")
    benchmark(fwd_bwd(candidates(T)[name], inputs(T)))


def main() -> None:
    p = bench_parser(__doc__, rounds=7)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    a = parse_bench_args(p)
    print(f"torch {torch.__version__}, {a.allocator}, {a.threads} threads, fp32, B=1 H={H} hd={HD}, causal, forward+backward")
    print("| T | zoo / sdpa | zoo / textbook | zoo ms | sdpa ms | textbook ms | saved bytes zoo | saved bytes textbook |")
    print("|---|---|---|---|---|---|---|---|")
    for T in a.lengths:
        qkv = inputs(T)
        cands = candidates(T)
        cases = {n: fwd_bwd(f, qkv) for n, f in cands.items()}
        t = compare_times(cases, rounds=a.rounds, num_threads=a.threads)
        saved = {n: saved_tensor_bytes(lambda f=f, qkv=qkv: f(*qkv)) for n, f in cands.items()}
        print(f"| {T} | {ratio(t, 'zoo', 'sdpa'):.3f} | {ratio(t, 'zoo', 'textbook'):.3f} | "
              f"{t['zoo'].median * 1e3:.1f} | {t['sdpa'].median * 1e3:.1f} | "
              f"{t['textbook'].median * 1e3:.1f} | {saved['zoo']:,} | {saved['textbook']:,} |")


if __name__ == "__main__":
    main()
