"""One Mamba block against mambapy's MambaBlock (parallel scan) and the step-by-step reference.

d_model 512, d_state 16, expand 2, batch 1, fp32, side by side in alternating rounds; peak
memory as the increase of the peak RSS during one forward+backward, each case in a fresh
process; growth of time and of the peak from L=1024 to 16384.

    python bench/bench_mamba.py                       # the tables in docs/mamba.md
    pytest bench/bench_mamba.py --benchmark-only      # pytest-benchmark timings
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

import zoo
from zoo.measure import compare_times, keep_freed_memory, loglog_slope, peak_rss_bytes, ratio

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


@pytest.mark.parametrize("name", ["zoo"])
def test_mamba_block_forward_backward_1024(benchmark, name):
    benchmark(fwd_bwd(*build(name, 1024)))


def rss_case(name: str, L: int) -> int:
    """Peak RSS increase of one forward+backward, measured in a fresh interpreter."""
    code = ("import json, sys; sys.path.insert(0, 'bench'); import bench_mamba as b; "
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--growth", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc keeps freed memory for reuse, as a caching allocator does (zoo.measure.keep_freed_memory)")
    a = p.parse_args()
    alloc = keep_freed_memory() if a.keep_freed_memory else "system allocator (glibc defaults)"
    print(f"torch {torch.__version__}, {alloc}, {a.threads} threads, fp32, batch 1, d_model {D}, d_state 16, expand 2")
    L = a.length
    zoo_m, x = build("zoo", L)
    peer_m, _ = build("mambapy", L)
    ref_m, _ = build("reference", L)
    t = compare_times({"zoo": fwd_bwd(zoo_m, x), "mambapy": fwd_bwd(peer_m, x)}, rounds=a.rounds, num_threads=a.threads)
    f = compare_times({"zoo": lambda: zoo_m(x), "mambapy": lambda: peer_m(x)}, rounds=a.rounds, num_threads=a.threads)
    r = compare_times({"zoo": fwd_bwd(zoo_m, x), "reference": fwd_bwd(ref_m, x)}, rounds=max(1, a.rounds // 2),
                      num_threads=a.threads, min_run_time=0.5)
    rss = {n: rss_case(n, L) for n in ("zoo", "mambapy")}
    print(f"\n### L={L}\n")
    print("| comparison | zoo ms | other ms | ratio zoo / other |")
    print("|---|---|---|---|")
    print(f"| forward+backward vs mambapy | {t['zoo'].median * 1e3:.1f} | {t['mambapy'].median * 1e3:.1f} | "
          f"{ratio(t, 'zoo', 'mambapy'):.3f} |")
    print(f"| forward vs mambapy | {f['zoo'].median * 1e3:.1f} | {f['mambapy'].median * 1e3:.1f} | "
          f"{ratio(f, 'zoo', 'mambapy'):.3f} |")
    print(f"| forward+backward vs step-by-step reference | {r['zoo'].median * 1e3:.1f} | "
          f"{r['reference'].median * 1e3:.1f} | {ratio(r, 'zoo', 'reference'):.4f} |")
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
        mems.append(rss_case("zoo", n))
    print("| forward+backward ms | " + " | ".join(f"{v * 1e3:.1f}" for v in times) + f" | {loglog_slope(a.growth, times):.3f} |")
    print("| peak memory MB | " + " | ".join(f"{v / 2**20:.1f}" for v in mems) + f" | {loglog_slope(a.growth, mems):.3f} |")


if __name__ == "__main__":
    main()
