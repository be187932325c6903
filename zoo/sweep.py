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

import fnmatch
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from zoo.errors import ZooConfigError
from zoo.findings import choice_of, choice_text, choose, extension_needed, longer_needed, runner_up, runner_up_needed


def read_rows(path: str | Path, skipped: list[str] | None = None) -> list[dict]:
    """Rows of a results file. A torn, malformed or undecodable line (not UTF-8, not JSON, not a
    row) is skipped, and noted in ``skipped`` ("file:line") when a list is given."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for n, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        if isinstance(row, dict) and "key" in row:
            rows.append(row)
        elif raw.strip() and skipped is not None:
            skipped.append(f"{path.name}:{n}")
    return rows


def _finished_at(row: dict) -> float:
    when = row.get("finished_at")
    return when if isinstance(when, (int, float)) and not isinstance(when, bool) else 0.0


SKIPPED: list[str] = []  # unreadable lines met by collect() ("file:line"); the report lists them


def collect(paths: list[str | Path]) -> list[dict]:
    """Rows of every results file under the given files or directories (shards included), merged
    by key: the row finished last wins (its ``finished_at``; rows without one count as oldest,
    and among equals the later file and line), whichever file it is in."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += sorted(p.glob("results*.jsonl")) if p.is_dir() else [p]
    merged: dict = {}
    for f in files:
        skipped: list[str] = []
        for row in read_rows(f, skipped):
            key = row["key"] if isinstance(row["key"], str) else repr(row["key"])
            if key not in merged or _finished_at(row) >= _finished_at(merged[key]):
                merged[key] = row
        SKIPPED.extend(s for s in skipped if s not in SKIPPED)  # collect runs many times in a sweep
    return [merged[k] for k in sorted(merged)]


class SweepLock:
    """One live sweep per results file: ``<results>.lock`` holds the owner's pid; a second sweep
    into the same file is refused while that process lives, and takes the lock over once it is
    gone (a killed sweep leaves a stale lock that nobody has to delete)."""

    def __init__(self, results: Path):
        self.path = results.with_name(results.name + ".lock")

    def __enter__(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise ZooConfigError(
                        f"{self.path.parent} is being written by another zoo bench (pid {pid}, lock {self.path.name}); "
                        "wait for it to finish, or give this run another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            return self
        raise ZooConfigError(f"could not take the sweep lock {self.path}")

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


CLUSTERS = ("local", "slurm", "debug")


class SubmititRunner:
    """Cases as jobs of submitit (SLURM, or its local executor on this machine, or ``debug`` in
    this process): the job runs :func:`run_isolated`, so a case still gets a fresh interpreter of
    its own on the node; the sweep here waits on the jobs and writes the rows, so resume, the
    newest-row rule and ``zoo report`` work unchanged. ``parameters`` go to
    ``AutoExecutor.update_parameters`` (``slurm_partition``, ``gpus_per_node``, ...)."""

    def __init__(self, cluster: str, folder: Path, parameters: dict | None = None, timeout: int = 600):
        if cluster not in CLUSTERS:
            from zoo.errors import unknown

            raise unknown("submitit cluster", cluster, CLUSTERS)
        try:
            import submitit
        except ImportError:
            raise ZooConfigError("--submitit needs the submitit package: pip install 'zoo[cluster]'") from None
        self.cluster = cluster
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        # the job may run past the case's own timeout by its start-up; run_isolated enforces the case's
        self.executor.update_parameters(timeout_min=max(1, -(-timeout // 60) + 5), name="zoo-bench",
                                        **(parameters or {}))

    def __call__(self, case: dict, timeout: int) -> dict:
        job = self.executor.submit(run_isolated, case, timeout)
        where = {"executor": f"submitit-{self.cluster}", "job_id": str(job.job_id)}
        try:
            row = job.result()
        except Exception as e:  # the job failed outside the case (scheduler, node): a row, not a crash
            tail = str(e).strip().splitlines()[-8:]
            row = {"key": case["key"], "case": case, "status": "error",
                   "error": "submitit job failed: " + "\n".join(tail), "wall_s": 0.0}
        return {**row, "ran_on": where}


def run_suite(suite, out_dir: Path, shard: str | None = None, retry_failed: bool = False, progress: bool = True,
              command: str = "", jobs: int = 1, rerun: bool | str = False, runner=None, timing_runner=None) -> Path:
    """Run the suite's unfinished cases (every case with ``rerun``: the new rows win, the old stay
    in the file); ``jobs`` > 1 runs training cases that many at a time
    (each in its own process with cores // jobs threads unless the suite sets threads), while
    timing cases (speed, decode) always run alone. Rows are appended as cases finish. ``runner``
    (case, timeout) -> row runs each training case (default :func:`run_forked` where the platform
    has a fork server, else :func:`run_isolated`; a :class:`SubmititRunner` sends them to a
    cluster), ``timing_runner`` each timing case (default :func:`run_isolated`: a new interpreter,
    the process whose memory peak the report has always quoted; forked cases read a median 16 %
    higher peak increase, timings the same), or ``runner`` when only that is given."""
    if jobs < 1:
        raise ZooConfigError(f"--jobs must be >= 1, got {jobs}")
    i, n = parse_shard(shard)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / ("results.jsonl" if n == 1 else f"results.shard{i}of{n}.jsonl")
    if results.exists() and not results.is_file():
        raise ZooConfigError(f"{results} is not a file; give --out a folder whose {results.name} is a results file")
    with SweepLock(results):
        if runner is None:
            runner = run_forked if forkserver_available() else run_isolated
            timing_runner = timing_runner or run_isolated
        return _run_locked(suite, out_dir, results, i, n, retry_failed, progress, command, jobs, rerun, runner,
                           timing_runner or runner)


def _run_locked(suite, out_dir: Path, results: Path, i: int, n: int, retry_failed: bool, progress: bool,
                command: str, jobs: int, rerun: bool | str, runner, timing_runner) -> Path:
    from zoo.suite import cases

    if results.is_file() and results.stat().st_size:
        with open(results, "rb") as f:  # a sweep killed mid-write left a torn line: end it
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:
            append_row_text(results, "\n")
    # every results file of the folder, shards included; the row finished last wins, as in the report
    done = {r["key"]: r for r in collect([out_dir]) if isinstance(r["key"], str)}
    every = cases(suite)
    todo = [c for c, g in zip(every, _shard_groups(every), strict=True) if g % n == i]

    def redo(key: str) -> bool:  # --rerun: every case, or those whose key matches the pattern
        return rerun is True or (isinstance(rerun, str) and fnmatch.fnmatchcase(key, rerun))

    def finished(c: dict) -> bool:  # same key *and* same settings: an edited suite reruns what it changed
        row = done.get(c["key"])
        flagged = row is not None and (row.get("status") not in ("ok", "skipped") or _contended(row))
        return (not redo(c["key"]) and row is not None and row.get("case") == json.loads(json.dumps(c))
                and not (flagged and retry_failed) and current(c, row) and not _entry_changed(c, row))

    def current(c: dict, row: dict) -> bool:
        """A seed or longer-budget row counts while its lr is today's choice and nothing of the
        tuning it was chosen from is left to run (a rate beyond the grid may still change the
        choice); a skipped longer-budget row, while the run it judged is still the latest; a skipped
        rate beyond the grid, while the rates tried still do not call for it."""
        prefix = _tune_prefix(c) if c.get("kind") == "findings" else ""
        if c.get("phase") == "extend" and row.get("status") == "skipped":
            if any(o["key"].startswith(prefix) and (o.get("phase") == "tune" or (
                    o.get("phase") == "extend" and o["extend"] < c["extend"])) and not finished(o) for o in todo):
                return False
            return not _extension_reopened(c, row, done)
        if c.get("phase") not in ("seed", "longer", "runnerup"):
            return True
        if any(o["key"].startswith(prefix) and o.get("phase") in ("tune", "extend") and not finished(o)
               for o in todo):
            return False
        if c["phase"] == "runnerup":  # the rate it ran is still the runner-up; a skip, still not needed
            group = _group_prefix(c)
            if any(o["key"].startswith(group) and o.get("phase") in ("seed", "longer") and not finished(o)
                   for o in todo):
                return False
            if row.get("status") == "skipped":
                return not _runner_up_reopened(c, row, done)
            return choice_of(row) == runner_up([r for k, r in done.items() if k.startswith(prefix)])
        choice = choose([r for k, r in done.items() if k.startswith(prefix)])
        if c["phase"] == "longer" and row.get("status") == "skipped":
            base = _base_row(c, choice, list(done.values()))
            return (base is not None and choice_of(row) == choice and _finished_at(base) <= _finished_at(row)
                    and not _longer_reopened(c, row, done))
        return choice_of(row) == choice

    pending = [c for c in todo if not finished(c)]
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(todo), initial=len(todo) - len(pending), disable=not progress, unit="case",
                   dynamic_ncols=True)
    except ImportError:  # pragma: no cover
        bar = None
    cores = os.cpu_count() or 1

    def reusable(c: dict, run: dict) -> bool:
        """A seed or longer-budget case left pending while its tuning might change the choice,
        whose row stands because the choice did not change: nothing to run."""
        row = done.get(c["key"])
        return (c.get("phase") in ("seed", "longer", "runnerup") and row is not None and not redo(c["key"])
                and row.get("status") == "ok" and row.get("case") == json.loads(json.dumps(c))
                and choice_of(row) == _choice(run) and not (retry_failed and _contended(row)))

    def record(case: dict, row: dict) -> None:
        row.update(suite=suite.name, command=command, finished_at=time.time())
        append_row(results, row)
        done[case["key"]] = row
        if bar is not None:
            bar.set_description(case["key"])
            bar.set_postfix_str(row["status"])
            bar.update(1)

    def start(case: dict, parallel: int) -> tuple[dict, dict | None]:
        """The case as it will run (threads set, lr resolved), or an error row."""
        run = dict(case)
        if not run.get("threads"):
            run["threads"] = max(1, cores // parallel)
        if case.get("phase") in ("seed", "longer"):  # the findings protocol: the lr the tune runs chose
            rows = collect([out_dir])  # every results file of the folder: shards included
            try:
                run = resolve_best_lr(run, rows)
            except ZooConfigError as e:
                return run, {"key": case["key"], "case": case, "status": "error", "error": str(e), "wall_s": 0.0}
            if case["phase"] == "longer" and not reusable(case, run):  # only where its seed's run still rose
                base = _base_row(case, _choice(run), rows)
                why = longer_needed(base, case["train"].get("stop_at", 0.0), _sibling_rows(case, _choice(run), rows))
                if why is not None:
                    return run, {"key": case["key"], "case": case, "status": "skipped", "reason": why,
                                 **_resolved(run), "wall_s": 0.0}
                # the suite's timeout is for its base budget: a longer one gets as much more time
                from zoo.config import TrainConfig

                base_steps = base["case"]["train"].get("max_steps", TrainConfig.max_steps)
                run["timeout"] = math.ceil(suite.timeout * case["train"]["max_steps"] / base_steps)
        if case.get("phase") == "runnerup":  # the tuning's second rate: only on a seed that stalled in a split
            run, why = resolve_runner_up(run, collect([out_dir]))
            if why is not None and not reusable(case, run):
                return run, {"key": case["key"], "case": case, "status": "skipped", "reason": why,
                             **_resolved(run), "wall_s": 0.0}
        if case.get("phase") == "extend":  # a rate beyond the grid: only where the choice sits at its edge
            prefix = _tune_prefix(case)
            why = extension_needed(case, [r for r in collect([out_dir]) if r["key"].startswith(prefix)])
            if why is not None:
                return run, {"key": case["key"], "case": case, "status": "skipped", "reason": why, "wall_s": 0.0}
        return run, None

    def finish(case: dict, run: dict, row: dict) -> dict:
        row["case"] = case  # as the suite states it (resume compares this)
        entry = mixer_entry(case)
        if entry is not None:  # and what its mixer's name meant when it ran (resume compares this too)
            row["mixer_entry"] = entry
        row["threads"] = run["threads"]
        if "visible_devices" in run:
            row["visible_devices"] = run["visible_devices"]
        if case.get("kind") == "findings":
            row.update(_resolved(run))
        return row

    _prepare(pending)
    timing = [c for c in pending if c["kind"] in ("speed", "decode")]
    training = [c for c in pending if c["kind"] not in ("speed", "decode")]
    for case in timing:  # alone on the machine: nothing else runs while they are timed
        run, error = start(case, 1)
        record(case, error or finish(case, run, timing_runner(run, suite.timeout)))
    if training:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        def blocked(c: dict) -> bool:
            """A seed case waits for the tune and extension cases of its mixer and setting; an
            extension case for the tune cases and the nearer extensions; a longer-budget case for
            all of those and the seed cases; a runner-up case for every other case of its mixer and
            setting."""
            if c.get("phase") not in ("seed", "extend", "longer", "runnerup"):
                return False
            prefix, group = _tune_prefix(c), _group_prefix(c)
            later = {"longer": ("longer", "runnerup"), "runnerup": ("runnerup",)}
            return any(o["key"].startswith(group) and o["phase"] not in later[c["phase"]] if c["phase"] in later else
                       o["key"].startswith(prefix) and (c["phase"] == "seed" or o["phase"] == "tune"
                                                        or o.get("extend", 0) < c["extend"])
                       for o in waiting + [case for case, _ in running.values()])

        waiting, running = list(training), {}
        # a multi-GPU host: each parallel case gets a GPU of its own (CUDA_VISIBLE_DEVICES), at
        # most one case per GPU
        gpus = _gpu_count() if jobs > 1 else 0
        free = list(range(gpus))
        if gpus > 1 and jobs > gpus:
            print(f"--jobs {jobs} on {gpus} GPUs: {gpus} cases at a time, one GPU each", file=sys.stderr)
            jobs = gpus
        with ThreadPoolExecutor(max_workers=jobs) as pool:  # threads only wait on the case processes
            while waiting or running:
                # a setting's seed cases go first once its tuning is done, so a sweep stopped
                # part way has whole verdicts rather than every setting half-tuned
                order = {"seed": 0, "extend": 1, "longer": 1, "runnerup": 1}  # then tune: a setting before another
                while len(running) < jobs:  # a case that needs no run (skipped, reused) frees its slot at once
                    # extension and longer-budget cases that turn out not to be needed are settled
                    # first, whatever their place: their rows cost nothing and unblock their
                    # setting's seed runs
                    for c in [c for c in waiting if c.get("phase") in ("extend", "longer", "runnerup")
                              and not blocked(c)]:
                        run, error = start(c, jobs)
                        if error:
                            waiting.remove(c)
                            record(c, error)
                    ready = sorted((c for c in waiting if not blocked(c)), key=lambda c: order.get(c.get("phase"), 2))
                    if not ready:
                        break
                    c = ready[0]
                    waiting.remove(c)
                    run, error = start(c, jobs)
                    if error:
                        record(c, error)
                        continue
                    if reusable(c, run):
                        if bar is not None:
                            bar.update(1)
                        continue
                    if gpus > 1:
                        run["visible_devices"] = str(free.pop(0))
                    running[pool.submit(runner, run, run.pop("timeout", suite.timeout))] = (c, run)
                if not running:
                    continue
                finished_now, _ = wait(list(running), return_when=FIRST_COMPLETED)
                for fut in finished_now:
                    c, run = running.pop(fut)
                    if "visible_devices" in run:
                        free.append(int(run["visible_devices"]))
                    record(c, finish(c, run, fut.result()))
    if bar is not None:
        bar.close()
    return results


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _die_with_parent() -> None:  # pragma: no cover (runs in the child between fork and exec)
    """Linux: the case process gets SIGKILL when the sweep that started it dies (kill -9
    included), so no orphan competes with a resumed sweep."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _die_with_sweep(pid: int) -> None:  # pragma: no cover (runs in the forked case)
    """A forked case's parent is the fork server, which exits when the sweep does, but only
    once no process holds the server's 'alive' pipe, and every forked case inherits it: a
    killed sweep left its cases training on as orphans (measured: a whole run's CPU) beside
    the next sweep. A watcher thread takes the case's session down once the sweep is gone."""
    import signal
    import threading

    def watch():
        while _running(pid):
            time.sleep(1.0)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="zoo-die-with-sweep", daemon=True).start()


def _running(pid: int) -> bool:
    """The process lives and is not a zombie (dead, not yet reaped by its parent)."""
    if not _alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc: os.kill's answer stands


def run_isolated(case: dict, timeout: int, argv: list[str] | None = None) -> dict:
    """One case in a fresh interpreter, in its own process group; never raises. A case past its
    timeout is killed with everything it started (a compiler, ninja), not only the interpreter.
    ``argv`` replaces the command (tests)."""
    import signal

    start = time.perf_counter()
    base = {"key": case["key"], "case": case}
    argv = argv or [sys.executable, "-m", "zoo.sweep", json.dumps(case)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_die_with_parent)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {**base, "status": "timeout", "error": f"no result within {timeout} s", "wall_s": timeout}
    finally:
        if proc.poll() is None:  # interrupted while waiting (Ctrl-C): take the case down too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:  # whatever the case left running in its group (it has exited) goes too
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wall = time.perf_counter() - start
    if proc.returncode < 0:
        sig = -proc.returncode
        why = " (out of memory?)" if sig == 9 else ""
        return {**base, "status": "killed", "error": f"killed by signal {sig}{why}", "wall_s": wall}
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (stderr or stdout).strip().splitlines()[-8:]
        return {**base, "status": "error", "error": "\n".join(tail), "wall_s": wall}
    return {**base, **json.loads(lines[-1]), "wall_s": wall}


def _contended(row: dict) -> bool:
    result = row.get("result")
    return isinstance(result, dict) and result.get("contended") is True


def case_status(suite, out_dir: Path) -> list[tuple[str, str]]:
    """(key, status) of every case of the suite against the results in out_dir, without running
    anything: pending, changed (a row with other settings, or made before its mixer's registry
    entry changed), stale (a seed run made with another
    lr than the tuning now chooses; a runner-up run made with another lr than its second
    choice), pending (skipped before; ...) where a skipped row is now needed, ok, contended, or
    the row's status (skipped: a rate beyond the findings grid, a longer budget or a runner-up
    rate that was not needed)."""
    from zoo.suite import cases

    done = {r["key"]: r for r in collect([out_dir]) if isinstance(r["key"], str)} if out_dir.is_dir() else {}
    out = []
    todo = cases(suite)
    open_ext = {_tune_prefix(c) for c in todo if c.get("phase") == "extend" and (
        c["key"] not in done or _extension_reopened(c, done[c["key"]], done))}
    for c in todo:
        row = done.get(c["key"])
        if row is None:
            out.append((c["key"], "pending"))
        elif row.get("case") != json.loads(json.dumps(c)):
            out.append((c["key"], "changed"))
        elif _entry_changed(c, row):
            out.append((c["key"], f"changed (the registry entry of {c['mixer']!r})"))
        elif _extension_reopened(c, row, done):
            out.append((c["key"], "pending (skipped before; the rates tried now call for it)"))
        elif _longer_reopened(c, row, done):
            out.append((c["key"], "pending (skipped before; another seed's run now calls for it)"))
        elif _runner_up_reopened(c, row, done):
            out.append((c["key"], "pending (skipped before; the seeds now split)"))
        elif c.get("phase") == "runnerup" and row.get("status") == "ok" and choice_of(row) != (
                second := runner_up([r for k, r in done.items() if k.startswith(_tune_prefix(c))])):
            out.append((c["key"], f"stale (lr {choice_text(choice_of(row))}; the tuning's runner-up is now "
                                  f"{choice_text(second)})"))
        elif c.get("phase") in ("seed", "longer") and row.get("status") in ("ok", "skipped") and choice_of(row) != (
                choice := choose([r for k, r in done.items() if k.startswith(_tune_prefix(c))])):
            out.append((c["key"], f"stale (lr {choice_text(choice_of(row))}; the tuning now chooses "
                                  f"{choice_text(choice)})"))
        elif c.get("phase") in ("seed", "longer") and _tune_prefix(c) in open_ext:
            out.append((c["key"], f"{row.get('status')} (a rate beyond the grid may still change its lr)"))
        else:
            out.append((c["key"], "contended" if _contended(row) else str(row.get("status"))))
    return out


def _prepare(todo: list[dict]) -> None:
    """Build what cases would otherwise build concurrently, once, here: the mamba C++ kernels
    (a case killed mid-compile would leave torch's build lock for every later case to wait on)."""
    if any(c.get("mixer") == "mamba" or "mamba" in json.dumps(c.get("model", {})) for c in todo):
        from zoo.mixers import selective_scan

        selective_scan.cpp_available()


def execute(case: dict) -> dict:
    """Run one case here (in the child process) and return its row."""
    import torch

    from zoo import measure

    if case.get("visible_devices") is not None:  # before anything touches CUDA: the case's own GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = case["visible_devices"]
    measure.set_allocator(case.get("allocator", "keep"))
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    kind = case["kind"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if kind in ("speed", "decode"):
        load_before = _load()
        result = (measure.measure_speed if kind == "speed" else measure.measure_decode)(case)
        # flagged when this process got well under its threads' worth of CPU while timing
        use = result.get("utilisation")
        result["contended"] = device == "cpu" and use is not None and use < measure.Utilisation.CONTENDED_BELOW
        result.update(load_before=load_before, load_after=_load())
    elif kind in ("quality", "extrapolation", "findings"):
        result = _train_case(case)
    else:
        raise ZooConfigError(f"unknown case kind {kind!r}")
    return {"status": "ok", "result": result, "env": measure.environment(device)}


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _train_case(case: dict) -> dict:
    import tempfile

    from zoo.config import Config, from_dict
    from zoo.train import fit, read_metrics

    model = {**case.get("model", {}), "mixer": case["mixer"]}
    if case["kind"] == "extrapolation":
        model["position"] = case["position"]
    with tempfile.TemporaryDirectory() as tmp:
        train = {"progress": False, **case.get("train", {}), "log_dir": tmp, "run_name": "run"}
        cfg = from_dict(Config, {"model": model, "task": {"name": case["task"], "args": case.get("task_args", {})},
                                 "train": train})
        out = fit(cfg)
        rows = read_metrics(out["run_dir"])
        curve = [[int(r["step"]), float(r["train/loss"])] for r in rows if r.get("train/loss")]
        val = [[int(r["step"]) + 1, float(r["val/accuracy"])] for r in rows if r.get("val/accuracy")]
        val_loss = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    result = {"metrics": out["metrics"], "params": out["params"], "steps": out["steps"],
              "train_seconds": out["train_seconds"], "loss_curve": curve, "val_curve": val,
              "val_loss": val_loss[-1] if val_loss else None}
    if case["kind"] == "findings":
        try:  # an aside: a mixer whose decoding fails must not cost the finished run its row
            result["state_bytes"] = _state_bytes(cfg)
        except Exception as e:
            result["state_bytes"], result["state_bytes_error"] = None, f"{type(e).__name__}: {e}"
    return result


def _state_bytes(cfg) -> int | None:
    """Bytes of the model's decode state after one sequence of the task's length (batch 1), or
    None when a mixer cannot decode: the state-size axis of the findings plots."""
    import dataclasses

    import torch

    from zoo.contract import state_nbytes
    from zoo.model import build_model
    from zoo.registry import default_registry
    from zoo.train import resolve

    resolved, task = resolve(cfg)
    reg = default_registry()
    if not all(reg.mixer(name).decode for name in dict.fromkeys(resolved.model.mixers)):
        return None  # the registry says a mixer cannot decode: nothing to step
    # the state is the mixers' whatever the head (a reconstruct or classify head does not decode)
    model = build_model(dataclasses.replace(resolved.model, head="lm")).eval()
    try:
        state = model.init_state(1)
        with torch.no_grad():
            for _ in range(task.seq_len):
                _, state = model.step(torch.zeros(1, dtype=torch.long), state)
    except ZooConfigError:
        return None
    return state_nbytes(state[1:])  # the mixers' states (not the position counter)


def mixer_entry(case: dict) -> dict | None:
    """What a case's mixer name means beyond the case: its registry entry's class and defaults.
    A row made before a registry edit (a default changed, another class) measured another
    mixer; the sweep reruns it. None where the case names no registered mixer."""
    from zoo.registry import default_registry

    try:
        e = default_registry().mixer(case["mixer"])
    except Exception:
        return None
    return json.loads(json.dumps({"class": e.class_path, "defaults": e.defaults}))


def _entry_changed(case: dict, row: dict) -> bool:
    """The row recorded its mixer's registry entry and the entry is another now (rows from before
    rows recorded it cannot tell, and stand)."""
    return "mixer_entry" in row and row["mixer_entry"] != mixer_entry(case)


def _shard_groups(cases: list[dict]) -> list[int]:
    """Each case's group for ``--shard``: its own index, except that a findings mixer and setting
    (tune, extension and seed cases) is one group, so one shard holds it whole: a seed run
    chooses its rate, and an extension decides whether it runs, from tune runs another shard
    might not have finished."""
    groups: dict[str, int] = {}
    return [groups.setdefault(_tune_prefix(c) if c.get("kind") == "findings" else c["key"], len(groups))
            for c in cases]


def _extension_reopened(case: dict, row: dict, done: dict[str, dict]) -> bool:
    """A rate beyond the findings grid that was skipped as not needed, which the tune rows now
    call for (the rule changed, or rows came in after it was judged)."""
    if case.get("phase") != "extend" or row.get("status") != "skipped":
        return False
    prefix = _tune_prefix(case)
    return extension_needed(case, [r for k, r in done.items() if k.startswith(prefix)]) is None


def _longer_reopened(case: dict, row: dict, done: dict[str, dict]) -> bool:
    """A longer budget that was skipped as not needed, which the runs of its mixer and setting
    now call for (another seed came near the target beside its stalled one; or the rule changed)."""
    if case.get("phase") != "longer" or row.get("status") != "skipped":
        return False
    rows = [r for k, r in done.items() if k.startswith(_group_prefix(case))]
    choice = choose([r for r in rows if r["key"].startswith(_tune_prefix(case))])
    if choice is None or choice_of(row) != choice:
        return False
    base = _base_row(case, choice, rows)
    return base is not None and longer_needed(base, case["train"].get("stop_at", 0.0),
                                              _sibling_rows(case, choice, rows)) is None


def _runner_up_reopened(case: dict, row: dict, done: dict[str, dict]) -> bool:
    """A runner-up case that was skipped as not needed, which the runs of its mixer and setting
    now call for (a longer budget or a seed run came in after it was judged; or the rule changed)."""
    if case.get("phase") != "runnerup" or row.get("status") != "skipped":
        return False
    return resolve_runner_up(case, list(done.values()))[1] is None


def resolve_runner_up(case: dict, rows: list[dict]) -> tuple[dict, str | None]:
    """A runner-up case with lr 'runnerup' (and weight decay, with a weight-decay grid) replaced
    by the tuning's second choice (:func:`zoo.findings.runner_up`), and why it need not run
    (None: it must)."""
    group = [r for r in rows if r["key"].startswith(_group_prefix(case))
             and r.get("case", {}).get("kind") == "findings"]
    second = runner_up([r for r in group if r["key"].startswith(_tune_prefix(case))])
    why = runner_up_needed(case["train"]["seed"], group, case["train"].get("stop_at", 0.0))
    if second is None:
        return case, why
    lr, wd = second
    return {**case, "train": {**case["train"], "lr": lr,
                              **({"weight_decay": wd} if case["train"].get("weight_decay") == "runnerup" else {})}}, why


def _sibling_rows(case: dict, choice: tuple | None, rows: list[dict]) -> list[dict]:
    """The finished runs of the other seeds of a longer-budget case's mixer and setting at the
    chosen rate (base budgets and longer ones)."""
    return [r for r in rows if r["key"].startswith(_group_prefix(case)) and r.get("status") == "ok"
            and r.get("case", {}).get("phase") in ("tune", "extend", "seed", "longer")
            and r["case"]["train"].get("seed") != case["train"]["seed"] and choice is not None
            and choice_of(r) == choice]


def _tune_prefix(case: dict) -> str:
    """The key prefix of a findings case's tune and extension cases (its mixer and setting)."""
    return f"{_group_prefix(case)}lr="


def _group_prefix(case: dict) -> str:
    """The key prefix of every findings case of the case's mixer and setting."""
    return f"findings/{case['setting']}/{case['mixer']}/"


def _base_row(case: dict, choice: tuple | None, rows: list[dict]) -> dict | None:
    """The run a longer-budget case extends: its seed's run of the chosen rate (and weight decay)
    at the base budget (the tune or extension row for the first seed, the seed row for the
    others), the one finished last; None where there is none."""
    found = [r for r in rows if r["key"].startswith(_group_prefix(case)) and r.get("status") != "skipped"
             and r.get("case", {}).get("phase") in ("tune", "extend", "seed")
             and r["case"]["train"].get("seed") == case["train"]["seed"] and choice is not None
             and choice_of(r) == choice]
    return max(found, key=_finished_at, default=None)


def _choice(run: dict) -> tuple:
    """The (lr, weight decay) a resolved findings case runs with, as :func:`choice_of` reads it."""
    return run["train"]["lr"], run["train"].get("weight_decay")


def _resolved(run: dict) -> dict:
    """What a findings row records of its resolved case: the lr, and the weight decay of a grid."""
    wd = run["train"].get("weight_decay")
    return {"lr": run["train"]["lr"], **({"weight_decay": wd} if wd is not None else {})}


def resolve_best_lr(case: dict, rows: list[dict]) -> dict:
    """A seed or longer-budget case of the findings protocol with lr 'best' (and weight decay
    'best', with a weight-decay grid) replaced by the tune runs' choice."""
    prefix = _tune_prefix(case)
    choice = choose([r for r in rows if r["key"].startswith(prefix)])
    if choice is None:
        raise ZooConfigError(f"{case['key']}: no finished tune run of {case['mixer']} on {case['setting']} to choose "
                             "the learning rate from (tune cases run first; rerun the suite)")
    lr, wd = choice
    return {**case, "train": {**case["train"], "lr": lr,
                              **({"weight_decay": wd} if case["train"].get("weight_decay") == "best" else {})}}


def child_row(case: dict) -> dict:
    """What a case process reports: its row, or a diverged or error row (never raises)."""
    import warnings

    warnings.filterwarnings("ignore")
    from zoo.errors import ZooDiverged

    try:
        return execute(case)
    except ZooDiverged as e:  # a result, not a failure of the zoo: the row says so
        return {"status": "diverged", "error": str(e), "result": {"steps": e.step}}
    except Exception as e:  # reported as a row by the parent
        return {"status": "error", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}


def main() -> None:  # the child side: python -m zoo.sweep CASE_JSON
    print(json.dumps(child_row(json.loads(sys.argv[1]))))


# -- the fork server: a fresh process per case without paying the imports again -------------------
PRELOAD = ["zoo.preload"]  # torch, Lightning, torchmetrics and the zoo, imported once by the server
_forkserver_context = None


def forkserver_available() -> bool:
    import multiprocessing as mp

    return sys.platform.startswith("linux") and "forkserver" in mp.get_all_start_methods()


def _context():
    global _forkserver_context
    if _forkserver_context is None:
        import multiprocessing as mp

        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _forkserver_context = ctx
    return _forkserver_context


def _forked_case(case_json: str, conn, log_path: str, where: dict) -> None:  # pragma: no cover (in the child)
    """The case process, forked from the server: its own session (so a timeout kills everything
    it starts), killed with the sweep's server, output to a log file (as the subprocess
    launcher captures it); the row goes back through ``conn``. It takes the sweep's environment,
    working directory and import path as they are now (the server has those of its start: a
    registry overlay or PYTHONPATH set since would otherwise be missed)."""
    os.setsid()
    _die_with_parent()  # the server's death
    _die_with_sweep(where["sweep"])  # the sweep's: the server outlives it while a case holds its pipe
    os.environ.clear()
    os.environ.update(where["env"], ZOO_LAUNCHER="forkserver")  # recorded in the row's env
    os.chdir(where["cwd"])
    sys.path[:] = where["path"]
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    row = child_row(json.loads(case_json))
    conn.send(json.dumps(row))
    conn.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_forked(case: dict, timeout: int) -> dict:
    """One case in a fresh process forked from a server that has already imported torch and the
    zoo (``multiprocessing``'s forkserver): the same isolation as :func:`run_isolated` (own
    process, own session killed whole on timeout, own peak memory: the case measures increases
    over its own start) without the interpreter start-up and imports of every case."""
    import signal
    import tempfile

    start = time.perf_counter()
    base = {"key": case["key"], "case": case}
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    with tempfile.NamedTemporaryFile(prefix="zoo-case-", suffix=".log", delete=False) as log:
        log_path = log.name
    where = {"env": dict(os.environ), "cwd": os.getcwd(), "path": list(sys.path), "sweep": os.getpid()}
    proc = ctx.Process(target=_forked_case, args=(json.dumps(case), send, log_path, where), daemon=False)
    proc.start()
    send.close()

    def kill_group():
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            proc.kill()

    try:
        text = recv.recv() if recv.poll(timeout) else None
    except EOFError:  # the case died before it could answer
        text = None
    finally:
        if text is None and proc.is_alive():  # timed out, or interrupted: take the case down
            kill_group()
        proc.join()
        try:  # whatever the case left running in its session goes too
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    wall = time.perf_counter() - start
    try:
        tail = Path(log_path).read_text(errors="replace").strip().splitlines()[-8:]
    finally:
        Path(log_path).unlink(missing_ok=True)
    if text is None and proc.exitcode is not None and proc.exitcode < 0 and wall < timeout:
        sig = -proc.exitcode
        why = " (out of memory?)" if sig == 9 else ""
        return {**base, "status": "killed", "error": f"killed by signal {sig}{why}", "wall_s": wall}
    if text is None and wall >= timeout:
        return {**base, "status": "timeout", "error": f"no result within {timeout} s", "wall_s": timeout}
    if text is None:
        return {**base, "status": "error", "error": "\n".join(tail) or f"exit code {proc.exitcode}", "wall_s": wall}
    return {**base, **json.loads(text), "wall_s": wall}


if __name__ == "__main__":
    main()
