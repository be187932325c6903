"""MoE FFN against Hugging Face's MixtralSparseMoeBlock and a dense FFN of one expert's size.

8 experts, top-2, d_model 512, expert hidden 2048 (SwiGLU), 4096 tokens (``--tokens``), fp32,
forward+backward, side by side in alternating rounds. Top-2 does twice the dense FFN's work, so
2.0 is the ratio to the dense FFN with no routing overhead at all.

    python bench/bench_moe.py                        # the table in docs/moe.md
    python bench/bench_moe.py --tokens 256           # the fixed per-call cost
    pytest bench/bench_moe.py --benchmark-only       # pytest-benchmark timings
"""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.measure import bench_parser, compare_times, parse_bench_args, ratio, saved_tensor_bytes

D, HIDDEN, E, K, TOKENS = 512, 2048, 8, 2, 4096


def step(module, x):
    """One training step's forward, as the harness runs it: the gradients of the last step are
    gone (Lightning's ``zero_grad`` sets them to None), so backward writes fresh ones instead of
    adding into old ones (which would time a read and a write of every weight gradient more)."""
    def run():
        for p in module.parameters():
            p.grad = None
        x.grad = None
        return module(x)
    return run


def cases(tokens: int = TOKENS) -> dict:
    torch.manual_seed(0)
    x = torch.randn(1, tokens, D, requires_grad=True)
    ours = zoo.build_mixer("moe", D, n_experts=E, top_k=K, hidden=HIDDEN)
    dense = zoo.build_mixer("swiglu", D, hidden=HIDDEN)
    out = {"zoo moe": step(ours, x), "dense ffn (one expert)": step(dense, x)}
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
        cfg = MixtralConfig(hidden_size=D, intermediate_size=HIDDEN, num_local_experts=E, num_experts_per_tok=K)
        peer = MixtralSparseMoeBlock(cfg)
        with torch.no_grad():
            peer.gate.weight.copy_(ours.router.weight)
            peer.experts.gate_up_proj.copy_(ours.w_in)
            peer.experts.down_proj.copy_(ours.w_out)
        out["MixtralSparseMoeBlock"] = step(peer, x)
    except ImportError as e:
        print(f"(transformers not installed: {e}; pip install '.[peers]')")
    return out


def fwd_bwd(fn):
    def run():
        fn().sum().backward()
    return run


@pytest.mark.parametrize("name", ["zoo moe", "dense ffn (one expert)"])
def test_moe_forward_backward(benchmark, name):
    benchmark(fwd_bwd(cases()[name]))


def main() -> None:
    p = bench_parser(__doc__, rounds=7)
    p.add_argument("--tokens", type=int, default=TOKENS)
    a = parse_bench_args(p)
    print(f"torch {torch.__version__}, {a.allocator}, {a.threads} threads, fp32, {a.tokens} tokens, "
          f"d {D}, hidden {HIDDEN}, {E} experts, top-{K}, forward+backward")
    fns = cases(a.tokens)
    # What every step must write beyond the dense FFN: E experts' weight gradients instead of
    # one. Timed as a fill of that many bytes, beside the candidates.
    grads = [torch.empty(E * HIDDEN * 2 * D), torch.empty(E * D * HIDDEN)]
    one = [torch.empty(HIDDEN * 2 * D), torch.empty(D * HIDDEN)]
    timed = {n: fwd_bwd(f) for n, f in fns.items()}
    timed |= {"write E experts' weight gradients": lambda: [g.fill_(1.0) for g in grads],
              "write one expert's": lambda: [g.fill_(1.0) for g in one]}
    t = compare_times(timed, rounds=a.rounds, num_threads=a.threads)
    print("\n| candidate | ms | zoo moe / candidate | saved MB |")
    print("|---|---|---|---|")
    for n, f in fns.items():
        print(f"| {n} | {t[n].median * 1e3:.1f} | {ratio(t, 'zoo moe', n):.3f} | {saved_tensor_bytes(f) / 2**20:.1f} |")
    extra = t["write E experts' weight gradients"].median - t["write one expert's"].median
    floor = (K * t["dense ffn (one expert)"].median + extra) / t["dense ffn (one expert)"].median
    print(f"\nWriting {E} experts' weight gradients instead of one takes {extra * 1e3:.1f} ms more; "
          f"top-{K} work plus that write is {floor:.2f}x the dense FFN (the floor of the ratio without "
          "fusing the experts' weight-gradient products).")


if __name__ == "__main__":
    main()
