"""Run a suite case by case, each in a fresh process, appending one JSON row per case.

- Isolation: a case runs in ``python -m zoo.sweep CASE_JSON``; an exception, a timeout or a
  kill (out of memory) becomes a row with ``status`` error / timeout / killed, and the sweep
  goes on.
- Atomic append: a row is one ``write`` of one line to ``results.jsonl``, flushed and fsynced;
  a torn last line (a crash mid-write) is ignored when reading.
- Resume: a case that already has a row with the same settings is skipped; a case whose settings
  changed since (an edited suite, other ``--threads``) runs again and its new row supersedes the
  old one; ``--retry-failed`` reruns failed ones.
- Shards: ``--shard i/n`` runs cases i, i+n, i+2n, ...; ``zoo report`` merges shard files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from zoo.errors import ZooConfigError


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a results file; a torn or malformed line is skipped."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "key" in row:
            rows.append(row)
    return rows


def append_row(path: Path, row: dict) -> None:
    """One row as one line, in one write, flushed to disk."""
    append_row_text(path, json.dumps(row, sort_keys=True) + "\n")


def append_row_text(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ZooConfigError(f"--shard must look like i/n (e.g. 0/2), got {text!r}") from None
    if not 0 <= i < n:
        raise ZooConfigError(f"--shard {text}: need 0 <= i < n")
    return i, n


def run_suite(suite, out_dir: Path, shard: str | None = None, retry_failed: bool = False, progress: bool = True,
              command: str = "") -> Path:
    from zoo.suite import cases

    i, n = parse_shard(shard)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / ("results.jsonl" if n == 1 else f"results.shard{i}of{n}.jsonl")
    if results.is_file() and results.stat().st_size:
        with open(results, "rb") as f:  # a sweep killed mid-write left a torn line: end it
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:
            append_row_text(results, "\n")
    done = {r["key"]: r for r in read_rows(results)}  # the last row of a key wins, here and in the report
    todo = [c for k, c in enumerate(cases(suite)) if k % n == i]

    def finished(c: dict) -> bool:  # same key *and* same settings: an edited suite reruns what it changed
        row = done.get(c["key"])
        return (row is not None and row.get("case") == json.loads(json.dumps(c))
                and (row.get("status") == "ok" or not retry_failed))

    skip = {c["key"] for c in todo if finished(c)}
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), initial=len(skip), disable=not progress, unit="case", dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        bar = None
    for case in todo:
        if case["key"] in skip:
            continue
        if bar is not None:
            bar.set_description(case["key"])
        row = run_isolated(case, suite.timeout)
        row.update(suite=suite.name, command=command)
        append_row(results, row)
        if bar is not None:
            bar.set_postfix_str(row["status"])
            bar.update(1)
    if bar is not None:
        bar.close()
    return results


def run_isolated(case: dict, timeout: int) -> dict:
    """One case in a fresh interpreter; never raises."""
    start = time.perf_counter()
    base = {"key": case["key"], "case": case}
    try:
        r = subprocess.run([sys.executable, "-m", "zoo.sweep", json.dumps(case)], capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "status": "timeout", "error": f"no result within {timeout} s", "wall_s": timeout}
    wall = time.perf_counter() - start
    if r.returncode < 0:
        sig = -r.returncode
        why = " (out of memory?)" if sig == 9 else ""
        return {**base, "status": "killed", "error": f"killed by signal {sig}{why}", "wall_s": wall}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-8:]
        return {**base, "status": "error", "error": "\n".join(tail), "wall_s": wall}
    return {**base, **json.loads(lines[-1]), "wall_s": wall}


def execute(case: dict) -> dict:
    """Run one case here (in the child process) and return its row."""
    import torch

    from zoo import measure

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    kind = case["kind"]
    if kind == "speed":
        result = measure.measure_speed(case)
    elif kind == "decode":
        result = measure.measure_decode(case)
    elif kind in ("quality", "extrapolation"):
        result = _train_case(case)
    else:
        raise ZooConfigError(f"unknown case kind {kind!r}")
    import torch as _t

    env = measure.environment("cuda" if _t.cuda.is_available() else "cpu")
    return {"status": "ok", "result": result, "env": env}


def _train_case(case: dict) -> dict:
    import csv
    import tempfile

    from zoo.config import Config, from_dict
    from zoo.train import fit

    model = {**case.get("model", {}), "mixer": case["mixer"]}
    if case["kind"] == "extrapolation":
        model["position"] = case["position"]
    with tempfile.TemporaryDirectory() as tmp:
        train = {"progress": False, **case.get("train", {}), "log_dir": tmp, "run_name": "run"}
        cfg = from_dict(Config, {"model": model, "task": {"name": case["task"], "args": case.get("task_args", {})},
                                 "train": train})
        out = fit(cfg)
        rows = csv.DictReader(open(Path(out["run_dir"]) / "metrics.csv"))
        curve = [[int(r["step"]), float(r["train/loss"])] for r in rows if r.get("train/loss")]
    return {"metrics": out["metrics"], "params": out["params"], "steps": out["steps"],
            "train_seconds": out["train_seconds"], "loss_curve": curve}


def main() -> None:  # the child side: python -m zoo.sweep CASE_JSON
    import warnings

    warnings.filterwarnings("ignore")
    case = json.loads(sys.argv[1])
    from zoo.errors import ZooDiverged

    try:
        row = execute(case)
    except ZooDiverged as e:  # a result, not a failure of the zoo: the row says so
        print(json.dumps({"status": "diverged", "error": str(e), "result": {"steps": e.step}}))
        return
    except Exception as e:  # reported as a row by the parent
        print(json.dumps({"status": "error", "error": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc()[-2000:]}))
        return
    print(json.dumps(row))


if __name__ == "__main__":
    main()
