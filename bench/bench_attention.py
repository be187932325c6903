"""Efficient attention mixers against the public implementations of the same ideas, and growth.

fp32, batch 1, 8 heads, head dim 64, forward+backward, side by side in alternating rounds:
  window    (w=256, causal)          vs local-attention's LocalAttention, and causal SDPA
  lsh       (bucket 64, 4 rounds)    vs reformer-pytorch's LSHAttention
  linformer (k=256)                  vs linformer's LinformerSelfAttention (whole module)
  linear    (causal)                 vs linear-attention-transformer's causal_linear_attn
then the log-log slope of time and of bytes saved for backward from N=1024 to 16384, and the
whole modules (``--modules``): the zoo's window and lsh mixers with their registry defaults
against the same peers inside the same q/k/v and output projections (the same weights), at
windows 64..512 (lsh: buckets 64 and 128) and lengths 1024..16384.

    python bench/bench_attention.py                      # the tables in docs/efficient-attention.md
    python bench/bench_attention.py --modules            # the whole-module table
    pytest bench/bench_attention.py --benchmark-only     # pytest-benchmark timings at N=4096
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.measure import bench_parser, compare_times, loglog_slope, parse_bench_args, ratio, saved_tensor_bytes

H, HD = 8, 64
D = H * HD


def qkv(T, n=3):
    return [torch.randn(1, H, T, HD, requires_grad=True) for _ in range(n)]


def zoo_case(name: str, T: int):
    """A zero-argument forward for the zoo's mixer at length T (the attend core, or the whole
    module for linformer, whose peer is a whole module)."""
    if name == "window":
        m = zoo.build_mixer("window", D, n_heads=H, causal=True, window=256, global_tokens=[])
        q, k, v = qkv(T)
        return lambda: m.attend(q, k, v)
    if name == "lsh":
        m = zoo.build_mixer("lsh", D, n_heads=H, causal=True, bucket_size=64, n_hashes=4)
        qk, v = qkv(T, 2)
        return lambda: m.attend(qk, F.normalize(qk, dim=-1), v)
    if name == "linformer":
        m = zoo.build_mixer("linformer", D, n_heads=H, causal=False, max_len=max(T, 4096), k=256, bias=True)
        x = torch.randn(1, T, D, requires_grad=True)
        return lambda: m(x)
    if name == "linear":
        m = zoo.build_mixer("linear", D, n_heads=H, causal=True)
        q, k, v = qkv(T)
        return lambda: m.attend(q, k, v)
    raise ValueError(name)


def peer_cases(name: str, T: int) -> dict:
    """The public implementations to compare with (extra `peers`); empty if not installed."""
    out = {}
    try:
        if name == "window":
            from local_attention import LocalAttention
            la = LocalAttention(window_size=256, causal=True, look_backward=1, autopad=True,
                                use_rotary_pos_emb=False)
            q, k, v = qkv(T)
            out["local-attention"] = lambda: la(q, k, v)
        if name == "lsh":
            from reformer_pytorch.reformer_pytorch import LSHAttention
            peer = LSHAttention(bucket_size=64, n_hashes=4, causal=True)
            qk, v = qkv(T, 2)
            out["reformer-pytorch"] = lambda: peer(qk.view(H, T, HD), v.view(H, T, HD))[0]
        if name == "linformer":
            from linformer import LinformerSelfAttention
            peer = LinformerSelfAttention(dim=D, seq_len=max(T, 4096), k=256, heads=H)
            x = torch.randn(1, T, D, requires_grad=True)
            out["linformer"] = lambda: peer(x)
        if name == "linear":
            from linear_attention_transformer.linear_attention_transformer import causal_linear_attn
            q, k, v = qkv(T)
            out["linear-attention-transformer"] = lambda: causal_linear_attn(q, k, v)
    except ImportError as e:
        print(f"  (peer for {name} not installed: {e}; pip install '.[peers]')")
    if name == "window":
        q, k, v = qkv(T)
        out["causal SDPA"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out


def fwd_bwd(fn):
    def run():
        fn().sum().backward()
    return run


MIXERS = ["window", "lsh", "linformer", "linear"]


@pytest.mark.parametrize("name", MIXERS)
def test_zoo_forward_backward_4096(benchmark, name):
    benchmark(fwd_bwd(zoo_case(name, 4096)))


def side_by_side(T: int, rounds: int, threads: int) -> None:
    print(f"\n### Against peers at N={T} (forward+backward; ratio = zoo / peer, median of {rounds} rounds)\n")
    print("| mixer | peer | ratio time | zoo ms | peer ms | zoo saved MB | peer saved MB |")
    print("|---|---|---|---|---|---|---|")
    for name in MIXERS:
        ours = zoo_case(name, T)
        peers = peer_cases(name, T)
        cases = {"zoo": fwd_bwd(ours)} | {p: fwd_bwd(f) for p, f in peers.items()}
        t = compare_times(cases, rounds=rounds, num_threads=threads)
        zs = saved_tensor_bytes(ours) / 2**20
        for p, f in peers.items():
            ps = saved_tensor_bytes(f) / 2**20
            print(f"| {name} | {p} | {ratio(t, 'zoo', p):.3f} | {t['zoo'].median * 1e3:.1f} | "
                  f"{t[p].median * 1e3:.1f} | {zs:.1f} | {ps:.1f} |")


def growth(lengths, rounds: int, threads: int) -> None:
    print(f"\n### Growth from N={lengths[0]} to {lengths[-1]} (log-log slope of forward+backward time "
          "and of bytes saved for backward)\n")
    print("| mixer | " + " | ".join(f"ms @{n}" for n in lengths) + " | time slope | memory slope |")
    print("|---|" + "---|" * len(lengths) + "---|---|")
    for name in MIXERS:
        times, mems = [], []
        for T in lengths:
            fn = zoo_case(name, T)
            times.append(compare_times({"zoo": fwd_bwd(fn)}, rounds=rounds, num_threads=threads,
                                       min_run_time=0.2)["zoo"].median)
            mems.append(saved_tensor_bytes(fn))
        cells = " | ".join(f"{t * 1e3:.1f}" for t in times)
        print(f"| {name} | {cells} | {loglog_slope(lengths, times):.3f} | {loglog_slope(lengths, mems):.3f} |")


class Projected(torch.nn.Module):
    """A peer's attention core inside the zoo mixer's own projections (the same weights), so
    that whole modules compare: x -> qkv -> heads -> core -> merge -> out."""

    def __init__(self, zoo_mixer, core, shared_qk: bool = False):
        super().__init__()
        self.m, self.core, self.shared_qk = zoo_mixer, core, shared_qk

    def forward(self, x):
        B, T, _ = x.shape
        m = self.m
        if self.shared_qk:  # lsh: one q/k projection and v
            qk, v = m.qkv(x).view(B, T, 2, m.n_heads, m.head_dim).permute(2, 0, 3, 1, 4)
            y = self.core(qk, qk, v)
        else:
            q, k, v = m.project(x)
            y = self.core(q, k, v)
        return m.merge(y)


def module_cases(name: str, size: int, T: int) -> dict:
    """Zero-argument forwards of the whole zoo module (registry defaults but the window or
    bucket size) and of each peer core wrapped in its projections."""
    x = torch.randn(1, T, D, requires_grad=True)
    out = {}
    if name == "window":
        m = zoo.build_mixer("window", D, n_heads=H, causal=True, window=size)
        out["zoo"] = lambda: m(x)
        try:
            from local_attention import LocalAttention
            la = LocalAttention(window_size=size, causal=True, look_backward=1, autopad=True,
                                use_rotary_pos_emb=False)
            peer = Projected(m, la)
            out["local-attention"] = lambda: peer(x)
        except ImportError as e:
            print(f"  (local-attention not installed: {e}; pip install '.[peers]')")
        sdpa = Projected(m, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        out["causal SDPA"] = lambda: sdpa(x)
        proj = Projected(m, lambda q, k, v: v)
        out["projections only"] = lambda: proj(x)
    elif name == "lsh":
        m = zoo.build_mixer("lsh", D, n_heads=H, causal=True, bucket_size=size)
        out["zoo"] = lambda: m(x)
        try:
            from reformer_pytorch.reformer_pytorch import LSHAttention
            lsh = LSHAttention(bucket_size=size, n_hashes=m.n_hashes, causal=True)

            def core(qk, _, v):
                B, Hh, T_, hd = qk.shape
                return lsh(qk.reshape(B * Hh, T_, hd), v.reshape(B * Hh, T_, hd))[0].view(B, Hh, T_, hd)
            peer = Projected(m, core, shared_qk=True)
            out["reformer-pytorch"] = lambda: peer(x)
        except ImportError as e:
            print(f"  (reformer-pytorch not installed: {e}; pip install '.[peers]')")
        proj = Projected(m, lambda qk, _, v: v, shared_qk=True)
        out["projections only"] = lambda: proj(x)
    return out


def modules(lengths, rounds: int, threads: int, only: str | None = None) -> None:
    """Ratios of whole modules; "floor" is the projections' own time over the peer's: the
    ratio a zoo module with a free attention core would reach."""
    print(f"\n### Whole modules (projections included; ratio = zoo / peer, median of {rounds} rounds)\n")
    print("| mixer | size | N | peer | ratio time | floor (projections / peer) | zoo ms | peer ms | projections ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, sizes in (("window", (64, 128, 256, 512)), ("lsh", (64, 128))):
        for size in sizes:
            if only and only not in (name, f"{name}:{size}"):
                continue
            for T in lengths:
                cases = {k: fwd_bwd(f) for k, f in module_cases(name, size, T).items()}
                t = compare_times(cases, rounds=rounds, num_threads=threads, min_run_time=0.2)
                proj = t["projections only"].median
                for p in (k for k in t if k not in ("zoo", "projections only")):
                    print(f"| {name} | {size} | {T} | {p} | {ratio(t, 'zoo', p):.3f} | {proj / t[p].median:.3f} | "
                          f"{t['zoo'].median * 1e3:.1f} | {t[p].median * 1e3:.1f} | {proj * 1e3:.1f} |", flush=True)


def main() -> None:
    p = bench_parser(__doc__, rounds=5)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--growth", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--modules", type=int, nargs="*", default=None, metavar="N",
                   help="only the whole-module table, at these lengths (default 1024 4096 16384)")
    p.add_argument("--only", default=None, metavar="MIXER[:SIZE]",
                   help="with --modules: one mixer, or one mixer at one window / bucket size (e.g. lsh:128)")
    a = parse_bench_args(p)
    print(f"torch {torch.__version__}, {a.allocator}, {a.threads} threads, fp32, batch 1, {H} heads, head dim {HD}")
    torch.manual_seed(0)
    if a.modules is not None:
        modules(a.modules or [1024, 4096, 16384], max(1, a.rounds // 2), a.threads, a.only)
        return
    side_by_side(a.length, a.rounds, a.threads)
    growth(a.growth, max(1, a.rounds // 2), a.threads)


if __name__ == "__main__":
    main()
