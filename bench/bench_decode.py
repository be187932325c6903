"""Decoding: the zoo's softmax KV cache against Hugging Face's LlamaAttention with its
DynamicCache, at the same shapes (d_model 256, 4 heads of 64, RoPE, batch 1, fp32, SDPA).

Per context N, each side first holds a cache of N tokens (untimed), then a run of S = max(16,
N / 4) single-token steps is timed from a fresh copy of that cache, as a generator would use
it, so a capacity doubling inside the run counts once, as in use; the median over repetitions
of (run time / S) is the per-token latency. The projections, RoPE and attention over the cache
are on both sides; Hugging Face also builds the rotary cos/sin per step, as its models do.

    python bench/bench_decode.py --keep-freed-memory       # the table in docs/softmax.md
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

import zoo
from zoo.contract import decode
from zoo.measure import bench_parser, loglog_slope, parse_bench_args

D, H = 256, 4


def zoo_side(N: int):
    torch.manual_seed(0)
    m = zoo.build_mixer("softmax", D, causal=True, n_heads=H, position="rope").eval()
    x = torch.randn(1, N + max(16, N // 4), D)
    with torch.no_grad():
        _, state = decode(m, x[:, :N])

    def run(steps: torch.Tensor):
        s = copy.deepcopy(state)
        for t in range(steps.shape[1]):
            _, s = m.step(steps[:, t], s)

    return run, x[:, N:]


def hf_side(N: int):
    from transformers import DynamicCache, LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=D, num_attention_heads=H, num_key_value_heads=H, head_dim=D // H,
                      attention_bias=False, attn_implementation="sdpa", num_hidden_layers=1)
    attn, rope = LlamaAttention(cfg, layer_idx=0).eval(), LlamaRotaryEmbedding(cfg)
    x = torch.randn(1, N + max(16, N // 4), D)
    cache = DynamicCache(config=cfg)
    pos = torch.arange(N)[None]
    mask = torch.full((N, N), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        attn(x[:, :N], position_embeddings=rope(x[:, :N], pos), attention_mask=mask, cache=cache)

    def run(steps: torch.Tensor):
        c = copy.deepcopy(cache)
        for t in range(steps.shape[1]):
            xt = steps[:, t : t + 1]
            attn(xt, position_embeddings=rope(xt, torch.tensor([[N + t]])), attention_mask=None, cache=c)

    return run, x[:, N:]


def per_token(run, steps, rounds: int) -> float:
    with torch.no_grad():
        run(steps)  # warm-up
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            run(steps)
            times.append((time.perf_counter() - start) / steps.shape[1])
    return statistics.median(times)


def main() -> None:
    p = bench_parser(__doc__, rounds=5)
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    a = parse_bench_args(p)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {a.allocator}, {a.threads} threads, fp32, batch 1, d_model {D}, {H} heads, RoPE")
    rows = []
    for N in a.contexts:
        z, h = zoo_side(N), hf_side(N)
        tz, th = [], []
        for r in range(a.rounds):  # alternate the sides
            order = [(z, tz), (h, th)] if r % 2 == 0 else [(h, th), (z, tz)]
            for (run, steps), out in order:
                out.append(per_token(run, steps, 1))
        rows.append((N, statistics.median(tz), statistics.median(th),
                     statistics.median(a / b for a, b in zip(tz, th, strict=True))))
    print("\n| context | zoo us/token | Hugging Face us/token | ratio zoo / HF |")
    print("|---|---|---|---|")
    for N, tz, th, r in rows:
        print(f"| {N} | {tz * 1e6:.0f} | {th * 1e6:.0f} | {r:.2f} |")
    ns = [r[0] for r in rows]
    print(f"\nslope of per-token time against context: zoo {loglog_slope(ns, [r[1] for r in rows]):.2f}, "
          f"Hugging Face {loglog_slope(ns, [r[2] for r in rows]):.2f}")


if __name__ == "__main__":
    main()
