"""The linear-cost recurrent mixers (retnet, gla, deltanet, gated_deltanet, s4d, mamba2):
forward+backward time against length, their growth slope and crossover with softmax, and
mamba2 against Hugging Face's Mamba2Mixer (its pure-PyTorch path: the only public
implementation of these mixers that runs on a CPU; fla, torchscale and the S4 repository do
not, see docs/recurrent.md).

d_model 256, batch 1, fp32, each mixer with its registry defaults; every length timed side by
side with softmax in alternating rounds.

    python bench/bench_recurrent.py --keep-freed-memory      # the tables in docs/recurrent.md
    python bench/bench_recurrent.py --keep-freed-memory --mixers gla --chunks 8 16 32 --growth 1024 16384
    pytest bench/bench_recurrent.py --benchmark-only           # pytest-benchmark timings
"""

from __future__ import annotations

import math

import pytest
import torch

import zoo
from zoo.measure import bench_parser, compare_times, loglog_slope, parse_bench_args, ratio

D = 256
MIXERS = ["retnet", "gla", "deltanet", "gated_deltanet", "s4d", "mamba2"]


def build(name: str, L: int):
    torch.manual_seed(0)
    return zoo.build_mixer(name, D), torch.randn(1, L, D, requires_grad=True)


def hf_mamba2(ours):
    """Hugging Face's Mamba2Mixer with the zoo module's weights and shapes."""
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    cfg = Mamba2Config(hidden_size=D, num_heads=ours.nheads, head_dim=ours.headdim, state_size=ours.d_state,
                       expand=ours.expand, n_groups=ours.ngroups, conv_kernel=ours.d_conv, chunk_size=256,
                       use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5, num_hidden_layers=1)
    peer = Mamba2Mixer(cfg, layer_idx=0).eval()  # eval: training mode first tries the CUDA-only fused path
    peer.load_state_dict(ours.state_dict())
    return peer


def fwd_bwd(m, x):
    def run():
        m(x).sum().backward()
    return run


@pytest.mark.parametrize("name", MIXERS)
def test_forward_backward_4096(benchmark, name):
    benchmark(fwd_bwd(*build(name, 4096)))


def crossover(lengths: list[int], ours: list[float], softmax: list[float]) -> str:
    """The length from which the mixer is faster than softmax (log-log interpolation between the
    measured lengths), or where it stays."""
    r = [math.log(a / b) for a, b in zip(ours, softmax, strict=True)]
    if r[0] <= 0:
        return f"<= {lengths[0]}"
    for i in range(1, len(r)):
        if r[i] <= 0:
            f = r[i - 1] / (r[i - 1] - r[i])
            return f"{math.exp(math.log(lengths[i - 1]) + f * math.log(lengths[i] / lengths[i - 1])):.0f}"
    return f"> {lengths[-1]}"


def chunk_sizes(a) -> None:
    """Forward+backward ms of each mixer at each chunk size, the sizes timed side by side."""
    print("\n| mixer | L | " + " | ".join(f"chunk {c}" for c in a.chunks) + " |")
    print("|---|---|" + "---|" * len(a.chunks))
    for name in a.mixers:
        for L in a.growth:
            torch.manual_seed(0)
            x = torch.randn(1, L, D, requires_grad=True)
            cases = {f"chunk {c}": fwd_bwd(zoo.build_mixer(name, D, chunk=c), x) for c in a.chunks}
            t = compare_times(cases, rounds=a.rounds, num_threads=a.threads, min_run_time=0.2, warmup=1)
            print(f"| {name} | {L} | " + " | ".join(f"{t[f'chunk {c}'].median * 1e3:.1f}" for c in a.chunks) + " |", flush=True)


def main() -> None:
    p = bench_parser(__doc__, rounds=3)
    p.add_argument("--growth", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--mixers", nargs="+", default=MIXERS)
    p.add_argument("--peer-length", type=int, default=4096)
    p.add_argument("--chunks", nargs="+", type=int, default=None, metavar="C",
                   help="only compare these chunk sizes of --mixers (side by side) at the --growth lengths")
    a = parse_bench_args(p)
    print(f"torch {torch.__version__}, {a.allocator}, {a.threads} threads, fp32, batch 1, d_model {D}, "
          f"registry defaults")
    if a.chunks:
        chunk_sizes(a)
        return
    times: dict[str, list[float]] = {n: [] for n in ["softmax", *a.mixers]}
    for L in a.growth:
        for name in a.mixers:
            cases = {n: fwd_bwd(*build(n, L)) for n in ("softmax", name)}
            t = compare_times(cases, rounds=a.rounds, num_threads=a.threads, min_run_time=0.2, warmup=1)
            times[name].append(t[name].median)
            times.setdefault(f"softmax@{name}", []).append(t["softmax"].median)
    print(f"\n### Forward+backward ms, L = {a.growth[0]} .. {a.growth[-1]}\n")
    print("| mixer | " + " | ".join(str(n) for n in a.growth) + " | slope | faster than softmax from L = |")
    print("|---|" + "---|" * len(a.growth) + "---|---|")
    for name in a.mixers:
        sm = times[f"softmax@{name}"]
        print(f"| {name} | " + " | ".join(f"{v * 1e3:.1f}" for v in times[name])
              + f" | {loglog_slope(a.growth, times[name]):.3f} | {crossover(a.growth, times[name], sm)} |")
    sm = [min(v) for v in zip(*(times[f"softmax@{n}"] for n in a.mixers), strict=True)]
    print("| softmax (fastest of its rounds) | " + " | ".join(f"{v * 1e3:.1f}" for v in sm)
          + f" | {loglog_slope(a.growth, sm):.3f} | |")
    if "mamba2" in a.mixers:
        L = a.peer_length
        ours, x = build("mamba2", L)
        peer = hf_mamba2(ours)
        t = compare_times({"zoo": fwd_bwd(ours, x), "hf": fwd_bwd(peer, x)}, rounds=a.rounds, num_threads=a.threads)
        f = compare_times({"zoo": lambda: ours(x), "hf": lambda: peer(x)}, rounds=a.rounds, num_threads=a.threads)
        print(f"\n### mamba2 against Hugging Face's Mamba2Mixer (pure PyTorch), L = {L}\n")
        print("| | zoo ms | Hugging Face ms | ratio zoo / HF |")
        print("|---|---|---|---|")
        print(f"| forward+backward | {t['zoo'].median * 1e3:.1f} | {t['hf'].median * 1e3:.1f} | {ratio(t, 'zoo', 'hf'):.3f} |")
        print(f"| forward | {f['zoo'].median * 1e3:.1f} | {f['hf'].median * 1e3:.1f} | {ratio(f, 'zoo', 'hf'):.3f} |")


if __name__ == "__main__":
    main()
