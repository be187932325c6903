"""Measurement: time (side by side, alternating), bytes saved for backward, FLOPs.

Time uses ``torch.utils.benchmark.Timer.blocked_autorange`` (median of blocks; synchronizes
CUDA) with an explicit thread count. Several candidates are timed in alternating rounds (the
order rotates each round) and compared by the median of per-round ratios, because on a shared
machine whichever side runs first is otherwise penalised by several percent.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; the platform's word elsewhere)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str | torch.device = "cpu") -> dict:
    """What a result depends on: the device by name (the CPU's model, cores, the instruction-set
    level PyTorch uses; on CUDA the GPU and driver), torch, threads, python,
    platform, git revision, and the load when it was taken."""
    import platform
    import subprocess

    device = torch.device(device)
    env = {"device": device.type}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = "unknown"
    else:
        env["device_name"] = cpu_model()
    env["cpu"] = cpu_model()
    env["cores"] = os.cpu_count()
    env["isa"] = torch.backends.cpu.get_cpu_capability()
    env.update({"host": platform.node(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "allocator": _allocator, "launcher": os.environ.get("ZOO_LAUNCHER", "subprocess"),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "load": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                "python": platform.python_version(), "platform": platform.platform(), "git": code_revision()})
    return env


_REVISION: str | None = None


def code_revision() -> str:
    """The git revision of the zoo's code, with '+edits' where its tracked files (the package and
    registry.yaml) differ from it; 'unknown' outside a checkout. Taken once per process: a case
    forked from the sweep's server inherits the server's, the revision of the code it runs (the
    server imported it all when it started, zoo.preload), not of a checkout edited since."""
    import subprocess
    from pathlib import Path

    global _REVISION
    if _REVISION is None:
        root = Path(__file__).resolve().parent.parent

        def git(*args: str) -> str:
            try:
                out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=root)
                return out.stdout.strip()
            except (OSError, subprocess.SubprocessError):
                return ""

        rev = git("rev-parse", "--short", "HEAD")
        edited = rev and git("status", "--porcelain", "--untracked-files=no", "--", "zoo", "registry.yaml")
        _REVISION = (rev + ("+edits" if edited else "")) if rev else "unknown"
    return _REVISION


ALLOCATORS = ("keep", "system")
_allocator = "system allocator (glibc defaults)"  # what this process runs with (environment())


def set_allocator(name: str) -> str:
    """The zoo's measurement and training processes call this first: ``keep`` (the default)
    keeps freed memory for reuse (:func:`keep_freed_memory`), ``system`` leaves the C library's
    defaults. Recorded by :func:`environment` as ``allocator``; returns the description."""
    global _allocator
    if name not in ALLOCATORS:
        from zoo.errors import unknown

        raise unknown("allocator", name, ALLOCATORS)
    if name == "keep":
        _allocator = keep_freed_memory()
    return _allocator


def keep_freed_memory() -> str:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system.

    By default glibc serves every allocation above 32 MB with a fresh mmap and unmaps it on
    free, so each large tensor is page-faulted in (and zeroed by the kernel) again on every
    call: at N=16384 that tripled the forward+backward time of linear attention on the CPU and
    bent every growth slope upwards. A caching allocator (PyTorch's on CUDA; jemalloc or
    tcmalloc via LD_PRELOAD on the CPU) avoids this; this call does the same for glibc. It
    applies to every candidate of a benchmark alike. Returns what it did, for the record.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**30) == 1
    except (OSError, AttributeError, TypeError):
        ok = False
    global _allocator
    _allocator = "glibc malloc, freed memory kept (mmap off)" if ok else "system allocator (unchanged)"
    return _allocator


def bench_parser(doc: str, rounds: int) -> argparse.ArgumentParser:
    """The options every script in ``bench/`` shares: rounds, threads, the allocator."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc keeps freed memory for reuse, as a caching allocator does (keep_freed_memory)")
    return p


def parse_bench_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, apply ``--keep-freed-memory``, and record the allocator in ``allocator``."""
    a = p.parse_args()
    a.allocator = keep_freed_memory() if a.keep_freed_memory else "system allocator (glibc defaults)"
    return a


@dataclass
class Timing:
    name: str
    rounds: list[float]  # median seconds per call, one per round

    @property
    def median(self) -> float:
        return statistics.median(self.rounds)


def compare_times(
    cases: dict[str, Callable[[], object]],
    *,
    rounds: int = 5,
    min_run_time: float = 0.3,
    num_threads: int | None = None,
    warmup: int = 2,
) -> dict[str, Timing]:
    """Time each zero-argument callable, alternating them over ``rounds`` rounds."""
    threads = num_threads or torch.get_num_threads()
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    out = {name: Timing(name, []) for name in cases}
    names = list(cases)
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t = benchmark.Timer("fn()", globals={"fn": cases[name]}, num_threads=threads)
            out[name].rounds.append(t.blocked_autorange(min_run_time=min_run_time).median)
    return out


def ratio(timings: dict[str, Timing], a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b)."""
    return statistics.median(x / y for x, y in zip(timings[a].rounds, timings[b].rounds, strict=True))


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x): the exponent of the growth y ~ x^slope;
    NaN when fewer than two different x are given (no growth to fit)."""
    if len(set(xs)) < 2:
        return float("nan")
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def saved_tensor_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward during ``fn()`` (storage counted once).

    Exact and machine-independent: it is what the backward pass must keep alive, the part of
    training memory that grows with sequence length.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far. On Linux it is VmHWM of /proc/self/status
    (the peak of this address space; getrusage's ru_maxrss would carry the parent's peak across
    fork and exec). The peak only grows, so a case's memory is the increase over the peak just
    before it, in a fresh process per case (see ``bench/``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> int | None:
    """Linux: reset this process's peak resident memory (VmHWM) to its current resident memory
    (``/proc/self/clear_refs``, 5) and return that; None where it cannot. A case's memory is then
    the peak over what it held just before, whatever came earlier in the process: the same in a
    fresh interpreter and in a process forked from the sweep's server, and blind to transient
    peaks of building the model."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_kb("VmRSS:")


def flops(module, batch: int, length: int) -> int | None:
    """The module's own forward-FLOP formula (``flops(batch, length)``), or None: not counted.
    FlopCounterMode is no substitute for a missing formula: it sees neither custom kernels nor
    elementwise scans, so it would print a number that is wrong (it is recorded beside, as
    ``flops_counter``, for comparison)."""
    f = getattr(module, "flops", None)
    value = f(batch, length) if callable(f) else None
    return int(value) if value is not None else None


class Utilisation:
    """CPU time this process got over a timed section, per thread and second of wall time: near
    1 when its threads ran unhindered, lower when other processes took the cores (the flag of a
    timing measured under contention; on CUDA the host mostly waits, so it is not used there)."""

    CONTENDED_BELOW = 0.6

    def __init__(self, threads: int):
        self.threads, self.value = max(1, threads), None

    def __enter__(self):
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._wall
        if wall > 0:
            self.value = round((time.process_time() - self._cpu) / (wall * self.threads), 3)
        return False


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of ``fn()`` by ``FlopCounterMode`` (matmuls, convolutions and attention kernels,
    the CPU one included through zoo.flops; elementwise ops, softmax, scans and custom kernels
    are not counted)."""
    import zoo.flops  # noqa: F401  (registers the CPU attention kernel's formula)

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# -- the cases of a benchmark suite (each runs in a fresh process; see zoo.sweep) --------------
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _build(mixer: str, d_model: int, args: dict, causal: bool | None = None, length: int = 0):
    """A registry mixer for a benchmark case: ``args`` are its own keyword arguments (the suite
    split them per mixer); a mixer sized by ``max_len`` (linformer) is sized to the case's length
    unless ``args`` says otherwise."""
    from zoo.registry import SEQUENCE, accepted_kwargs, default_registry

    reg = default_registry()
    entry = reg.mixer(mixer)
    names, _ = accepted_kwargs(entry.cls)
    kwargs = dict(args)
    if entry.kind == SEQUENCE:
        kwargs.setdefault("causal", entry.causal if causal is None else causal)
        if "max_len" in names and length:
            kwargs.setdefault("max_len", length)
    return reg.build_mixer(mixer, d_model, **kwargs)


def measure_speed(case: dict) -> dict:
    """Time (median, tokens/s), peak RSS increase or CUDA peak, bytes saved for backward and
    forward FLOPs of one mixer at one length in one mode."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[case["dtype"]]
    T, B = case["length"], case["batch"]
    m = _build(case["mixer"], case["d_model"], case["args"], length=T).to(device=device, dtype=dtype)
    backward = case["mode"] == "forward_backward"
    m.train(backward)
    x = torch.randn(B, T, case["d_model"], device=device, dtype=dtype, requires_grad=backward)

    def run():
        if backward:
            m(x).float().sum().backward()
        else:
            with torch.no_grad():
                m(x)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        before = reset_peak_rss()
        before = peak_rss_bytes() if before is None else before
        run()
        peak = peak_rss_bytes() - before
    threads = torch.get_num_threads()
    with Utilisation(threads) as use:
        t = benchmark.Timer("run()", globals={"run": run}, num_threads=threads).blocked_autorange(min_run_time=0.5)
    row = {"seconds": t.median, "tokens_per_s": B * T / t.median, "peak_bytes": peak,
           "iqr_s": t.iqr, "blocks": len(t.times), "utilisation": use.value,
           "flops_forward": flops(m, B, T), "flops_counter": count_flops(lambda: m(x.detach())),
           "params": sum(p.numel() for p in m.parameters()),
           "backend": m.backend_for(device) if hasattr(m, "backend_for") else "n/a", "dtype": case["dtype"]}
    if backward:
        row["saved_bytes"] = saved_tensor_bytes(lambda: m(x))
    return row


def measure_decode(case: dict) -> dict:
    """Steady-state per-token latency of ``step()`` from ``context`` tokens, and the state's size.

    Each repetition starts from an untimed copy of the state after ``context`` tokens and times
    a run of S = max(16, context // 4) steps, threading the state as a generator does; the
    median over repetitions of (run time / S) is the latency. Growth is amortised as in use: a KV
    cache that is full at ``context`` doubles once in the run and counts once, not once per call
    (timing ``step`` on one state over and over would double, or copy, on every call)."""
    import copy
    import time

    from zoo.contract import decode, state_nbytes

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    T, B, d = case["context"], case["batch"], case["d_model"]
    S = max(16, T // 4)
    m = _build(case["mixer"], d, case["args"], causal=True).to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        x = torch.randn(B, 1, d, device=device).expand(B, T, d)
        _, state = decode(m, x)  # the context, one step at a time (as it would be generated)
        steps = x[:, :S]
        decode(m, steps, copy.deepcopy(state))  # warm-up
        times: list[float] = []
        with Utilisation(torch.get_num_threads()) as use:
            while len(times) < 3 or (sum(times) * S < 0.3 and len(times) < 50):
                s = copy.deepcopy(state)
                sync()
                start = time.perf_counter()
                decode(m, steps, s)
                sync()
                times.append((time.perf_counter() - start) / S)
    ordered = sorted(times)
    seconds = ordered[len(times) // 2]
    iqr = ordered[(3 * len(times)) // 4] - ordered[len(times) // 4]
    return {"seconds_per_token": seconds, "tokens_per_s": B / seconds, "state_bytes": state_nbytes(state),
            "decode_steps": S, "repeats": len(times), "threads": torch.get_num_threads(), "iqr_s": iqr,
            "utilisation": use.value}
