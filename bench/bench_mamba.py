"""One Mamba block against mambapy's MambaBlock (parallel scan) and the step-by-step reference.

d_model 512, d_state 16, expand 2, batch 1, fp32, side by side in alternating rounds; peak
memory as the increase of the peak RSS during one forward+backward, each case in a fresh
process; growth of time and of the peak from L=1024 to 16384.

    python bench/bench_mamba.py                       # the tables in docs/mamba.md
    pytest bench/bench_mamba.py --benchmark-only      # pytest-benchmark timings
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import zoo
from zoo.measure import bench_parser, compare_times, loglog_slope, parse_bench_args, peak_rss_bytes, ratio

D = 512


def build(name: str, L: int):
    torch.manual_seed(0)
    ours = zoo.build_mixer("mamba", D, d_state=16, expand=2)
    x = torch.randn(1, L, D, requires_grad=True)
    if name == "zoo":
        return ours, x
    if name == "reference":
        ref = zoo.build_mixer("mamba", D, d_state=16, expand=2, backend="reference")
        ref.load_state_dict(ours.state_dict())
        return ref, x
    from mambapy.mamba import MambaBlock, MambaConfig
    peer = MambaBlock(MambaConfig(d_model=D, n_layers=1, d_state=16, expand_factor=2))
    peer.load_state_dict(ours.state_dict())
    return peer, x


def fwd_bwd(m, x):
    def run():
        m(x).sum().backward()
    return run


def scan_case(backend: str, L: int, d_inner: int = 2 * D, N: int = 16):
    """The selective scan alone (the same random inputs for every backend), forward+backward."""
    from zoo.mixers import selective_scan

    scan = {"torch": selective_scan.fast_scan, "reference": selective_scan.reference_scan}[backend]

    g = torch.Generator().manual_seed(0)
    u, delta, z = (torch.randn(1, L, d_inner, generator=g, requires_grad=True) for _ in range(3))
    Bm, Cm = (torch.randn(1, L, N, generator=g, requires_grad=True) for _ in range(2))
    A = -torch.rand(d_inner, N, generator=g).add(0.5).requires_grad_()
    Dk, bias = (torch.randn(d_inner, generator=g, requires_grad=True) for _ in range(2))

    def run():
        scan(u, delta, A, Bm, Cm, Dk, z, bias).sum().backward()
    return run


@pytest.mark.parametrize("name", ["zoo"])
def test_mamba_block_forward_backward_1024(benchmark, name):
    benchmark(fwd_bwd(*build(name, 1024)))


def rss_case(name: str, L: int, keep_freed: bool = False) -> int:
    """Peak RSS increase of one forward+backward, measured in a fresh interpreter (with the
    parent's allocator setting)."""
    keep = "from zoo.measure import keep_freed_memory; keep_freed_memory(); " if keep_freed else ""
    code = (f"import json, sys; {keep}sys.path.insert(0, 'bench'); import bench_mamba as b; "
            f"print(json.dumps(b._rss_here({name!r}, {L})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss_here(name: str, L: int) -> int:
    m, x = build(name, L)
    fwd_bwd(m, x[:, :16].detach().requires_grad_())()  # loads kernels and thread pools, at a tiny size
    before = peak_rss_bytes()
    fwd_bwd(m, x)()
    return peak_rss_bytes() - before


def main() -> None:
    p = bench_parser(__doc__, rounds=5)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--growth", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    a = parse_bench_args(p)
    print(f"torch {torch.__version__}, {a.allocator}, {a.threads} threads, fp32, batch 1, d_model {D}, d_state 16, expand 2")
    L = a.length
    zoo_m, x = build("zoo", L)
    peer_m, _ = build("mambapy", L)
    ref_m, _ = build("reference", L)
    t = compare_times({"zoo": fwd_bwd(zoo_m, x), "mambapy": fwd_bwd(peer_m, x)}, rounds=a.rounds, num_threads=a.threads)
    f = compare_times({"zoo": lambda: zoo_m(x), "mambapy": lambda: peer_m(x)}, rounds=a.rounds, num_threads=a.threads)
    r = compare_times({"zoo": fwd_bwd(zoo_m, x), "reference": fwd_bwd(ref_m, x)}, rounds=max(1, a.rounds // 2),
                      num_threads=a.threads, min_run_time=0.5)
    sc = compare_times({"torch": scan_case("torch", L), "reference": scan_case("reference", L)},
                       rounds=max(1, a.rounds // 2), num_threads=a.threads, min_run_time=0.5)
    rss = {n: rss_case(n, L, a.keep_freed_memory) for n in ("zoo", "mambapy")}
    print(f"\n### L={L}\n")
    print("| comparison | zoo ms | other ms | ratio zoo / other |")
    print("|---|---|---|---|")
    print(f"| forward+backward vs mambapy | {t['zoo'].median * 1e3:.1f} | {t['mambapy'].median * 1e3:.1f} | "
          f"{ratio(t, 'zoo', 'mambapy'):.3f} |")
    print(f"| forward vs mambapy | {f['zoo'].median * 1e3:.1f} | {f['mambapy'].median * 1e3:.1f} | "
          f"{ratio(f, 'zoo', 'mambapy'):.3f} |")
    print(f"| forward+backward vs step-by-step reference | {r['zoo'].median * 1e3:.1f} | "
          f"{r['reference'].median * 1e3:.1f} | {ratio(r, 'zoo', 'reference'):.4f} |")
    print(f"| the scan alone, forward+backward, vs the step-by-step reference | {sc['torch'].median * 1e3:.1f} | "
          f"{sc['reference'].median * 1e3:.1f} | {ratio(sc, 'torch', 'reference'):.4f} |")
    print(f"| peak memory of forward+backward (MB) vs mambapy | {rss['zoo'] / 2**20:.1f} | "
          f"{rss['mambapy'] / 2**20:.1f} | {rss['zoo'] / rss['mambapy']:.3f} |")
    print(f"\n### Growth from L={a.growth[0]} to {a.growth[-1]}\n")
    print("| | " + " | ".join(str(n) for n in a.growth) + " | slope |")
    print("|---|" + "---|" * len(a.growth) + "---|")
    times, mems = [], []
    for n in a.growth:
        m, xn = build("zoo", n)
        times.append(compare_times({"zoo": fwd_bwd(m, xn)}, rounds=max(1, a.rounds // 2), num_threads=a.threads,
                                   min_run_time=0.2)["zoo"].median)
        mems.append(rss_case("zoo", n, a.keep_freed_memory))
    print("| forward+backward ms | " + " | ".join(f"{v * 1e3:.1f}" for v in times) + f" | {loglog_slope(a.growth, times):.3f} |")
    print("| peak memory MB | " + " | ".join(f"{v / 2**20:.1f}" for v in mems) + f" | {loglog_slope(a.growth, mems):.3f} |")


if __name__ == "__main__":
    main()
