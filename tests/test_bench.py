"""zoo bench / zoo report end to end on a tiny suite: every section, failures as rows,
resuming, shards, bad suite files."""

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

import zoo
from zoo.cli import main as zoo_main
from zoo.report import compare, write_report
from zoo.suite import cases, load_suite
from zoo.sweep import append_row, collect, read_rows, run_suite

TINY = """
timeout: 120
speed: {mixers: [softmax, linear], lengths: [32, 64], modes: [forward_backward], d_model: 16, args: {n_heads: 2}}
decode: {mixers: [linear], contexts: [8], d_model: 16, args: {n_heads: 2}}
quality:
  mixers: [softmax]
  tasks: {mqar: {vocab: 16, seq_len: 16, n_pairs: 1, train_size: 128, test_size: 32}}
  model: {d_model: 16, n_layers: 1, mixer_args: {n_heads: 2}}
  train: {max_steps: 10, val_every: 5}
"""

BROKEN = '''
import os
import torch
from torch import nn


class Raises(nn.Module):
    def __init__(self, d_model, *, causal=True):
        super().__init__()
        self.lin = nn.Linear(d_model, d_model)

    def forward(self, x):
        raise RuntimeError("this mixer always fails")


class Dies(Raises):
    def forward(self, x):
        os.kill(os.getpid(), 9)
'''


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_tiny_suite_end_to_end(tmp_path):
    suite_file = write(tmp_path, "tiny.yaml", TINY)
    assert zoo_main(["bench", str(suite_file), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    rows = read_rows(tmp_path / "out" / "results.jsonl")
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    speed = [r for r in rows if r["case"]["kind"] == "speed"]
    assert all(r["result"]["tokens_per_s"] > 0 and r["result"]["saved_bytes"] > 0 for r in speed)
    assert all(r["env"]["torch"] and r["env"]["threads"] >= 1 and r["result"]["dtype"] == "float32" for r in speed)
    from zoo.sweep import forkserver_available

    # --launcher auto: timing cases in a new interpreter, training cases forked from the server
    launchers = {r["case"]["kind"]: r["env"]["launcher"] for r in rows}
    assert launchers["speed"] == launchers["decode"] == "subprocess"
    assert launchers["quality"] == ("forkserver" if forkserver_available() else "subprocess")
    report = (tmp_path / "out" / "report.md").read_text()
    for section in ("## Environment", "## Quality", "### mqar", "## Speed and memory", "time slope",
                    "crossover vs softmax", "bytes saved for backward", "## Decoding", f"zoo bench {suite_file}"):
        assert section in report, section
    for png in ("quality_accuracy.png", "quality_loss_curves.png", "speed_forward_backward.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000


def test_failures_become_rows_and_the_sweep_goes_on(tmp_path, monkeypatch):
    write(tmp_path, "broken_mixers.py", BROKEN)
    overlay = write(tmp_path, "overlay.yaml", """
    sequence_mixers:
      raises: {class: broken_mixers.Raises, description: fails}
      dies: {class: broken_mixers.Dies, description: is killed}
    """)
    monkeypatch.setenv("ZOO_REGISTRY", str(overlay))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.syspath_prepend(str(tmp_path))
    suite = load_suite(str(write(tmp_path, "s.yaml",
                                 "speed: {mixers: [raises, dies, swiglu], lengths: [16], modes: [forward], d_model: 8}")))
    rows = {r["key"]: r for r in read_rows(run_suite(suite, tmp_path / "out", progress=False))}
    assert rows["speed/raises/forward/T=16"]["status"] == "error"
    assert "this mixer always fails" in rows["speed/raises/forward/T=16"]["error"]
    assert rows["speed/dies/forward/T=16"]["status"] == "killed"
    assert "signal 9 (out of memory?)" in rows["speed/dies/forward/T=16"]["error"]
    assert rows["speed/swiglu/forward/T=16"]["status"] == "ok"
    report = write_report(list(rows.values()), tmp_path / "out").read_text()
    assert "## Cases that did not finish" in report and "speed/dies/forward/T=16 | killed" in report


def test_interrupted_sweep_resumes_without_losing_rows(tmp_path):
    suite = load_suite(str(write(tmp_path, "s.yaml",
                                 "speed: {mixers: [mlp, swiglu], lengths: [8, 16], modes: [forward], d_model: 8}")))
    out = tmp_path / "out"
    out.mkdir()
    results = out / "results.jsonl"
    first = run_suite(suite, tmp_path / "full", progress=False)
    kept = read_rows(first)[:2]
    for row in kept:  # the two rows an interrupted run had finished ...
        append_row(results, row)
    with open(results, "a") as f:  # ... and the torn line it was writing when killed
        f.write('{"key": "speed/swiglu/forward/T=8", "sta')
    run_suite(suite, out, progress=False)
    rows = read_rows(results)
    assert sorted(r["key"] for r in rows) == sorted(c["key"] for c in cases(suite))
    assert rows[:2] == kept  # finished rows are neither lost nor redone


def test_an_edited_suite_reruns_only_the_cases_it_changed(tmp_path):
    text = "speed: {mixers: [mlp, swiglu], lengths: [8], modes: [forward], d_model: 8, args: {swiglu: {hidden: %d}}}"
    out = tmp_path / "out"
    run_suite(load_suite(str(write(tmp_path, "s.yaml", text % 16))), out, progress=False)
    before = read_rows(out / "results.jsonl")
    run_suite(load_suite(str(write(tmp_path, "s.yaml", text % 24))), out, progress=False)
    after = read_rows(out / "results.jsonl")
    assert [r["key"] for r in after[len(before):]] == ["speed/swiglu/forward/T=8"]
    latest = {r["key"]: r for r in collect([out])}
    assert latest["speed/swiglu/forward/T=8"]["case"]["args"] == {"hidden": 24}


def test_an_edited_registry_entry_reruns_the_cases_of_its_mixer(tmp_path, monkeypatch):
    """A case names its mixer; what the name means lives in the registry. A row made before the
    entry's defaults changed measured another mixer, so the sweep reruns it, and --list says why."""
    from zoo.registry import default_registry
    from zoo.sweep import case_status

    ran = []

    def runner(case, timeout):
        ran.append(case["key"])
        return {"key": case["key"], "status": "ok", "wall_s": 0.0, "result": {}}

    suite = load_suite(str(write(tmp_path, "s.yaml", "speed: {mixers: [mlp, swiglu], lengths: [8], modes: [forward], "
                                                      "d_model: 8}")))
    out = tmp_path / "out"
    run_suite(suite, out, progress=False, runner=runner)
    assert len(ran) == 2 and all(r["mixer_entry"]["class"] for r in read_rows(out / "results.jsonl"))
    run_suite(suite, out, progress=False, runner=runner)
    assert len(ran) == 2  # nothing changed: nothing reruns
    monkeypatch.setitem(default_registry().mixer("swiglu").defaults, "hidden", 24)
    assert dict(case_status(suite, out))["speed/swiglu/forward/T=8"] == "changed (the registry entry of 'swiglu')"
    run_suite(suite, out, progress=False, runner=runner)
    assert ran[2:] == ["speed/swiglu/forward/T=8"]
    assert read_rows(out / "results.jsonl")[-1]["mixer_entry"]["defaults"]["hidden"] == 24


def test_two_shards_merge_into_the_report_of_one_run(tmp_path):
    suite = load_suite(str(write(tmp_path, "s.yaml",
                                 "speed: {mixers: [mlp, swiglu], lengths: [8, 16], modes: [forward], d_model: 8}")))
    out = tmp_path / "out"
    for shard in ("0/2", "1/2"):
        run_suite(suite, out, shard=shard, progress=False)
    shard_files = sorted(out.glob("results.shard*.jsonl"))
    assert len(shard_files) == 2 and all(read_rows(f) for f in shard_files)
    merged = collect([out])
    assert sorted(r["key"] for r in merged) == sorted(c["key"] for c in cases(suite))
    one = tmp_path / "one"
    one.mkdir()
    for row in merged:
        append_row(one / "results.jsonl", row)
    assert write_report(collect([out]), tmp_path / "r1").read_text() == \
        write_report(collect([one]), tmp_path / "r2").read_text()
    assert zoo_main(["report", str(out), "--out", str(tmp_path / "r3")]) == 0
    cmp = compare(merged, merged, tmp_path / "cmp", ("a", "b")).read_text()
    assert "| speed/mlp/forward/T=8 (s) |" in cmp and "| 1.000 |" in cmp


@pytest.mark.parametrize("text,message", [
    ("speed: {lenghts: [8]}", r"unknown key 'lenghts' in suite s.yaml.speed \(did you mean 'lengths'"),
    ("speed: {modes: [backward]}", r"speed.modes has 'backward'; allowed: forward, forward_backward"),
    ("speed: {lengths: []}", r"lengths must be a non-empty list"),
    ("sped: {}", r"unknown key 'sped' in suite s.yaml \(did you mean 'speed'"),
    ("speed: {mixers: [sofmax]}", r"unknown mixer 'sofmax' \(did you mean 'softmax'"),
    ("speed: {mixers: [mlp], args: {n_heads: 2}}", r"speed.args: no mixer of \['mlp'\] takes 'n_heads'"),
    ("speed: [unclosed", r"is not valid YAML"),
    ("quality: {mixers: [softmax], model: {mixer_args: {d_state: 8}}}",
     r"quality.model.mixer_args: no mixer of \['softmax'\] takes 'd_state'"),
    ("quality: {mixers: [softmax], model: {d_modle: 8}}", r"unknown key 'd_modle' in suite 'x': quality.model"),
    ("quality: {mixers: [softmax], train: {max_stepz: 8}}",
     r"unknown key 'max_stepz' in suite 'x': quality.train \(did you mean 'max_steps'"),
    ("extrapolation: {positions: [rotary]}", r"unknown positional scheme in extrapolation.positions 'rotary'"),
    ("speed: {lengths: [8], batch: 0}", r"speed.batch and speed.d_model must be >= 1"),
    ("timeout: -1\nspeed: {lengths: [8]}", r"timeout must be >= 1 second"),
    ("allocator: jemalloc\nspeed: {lengths: [8]}", r"allocator must be keep or system, got 'jemalloc'"),
    ("description: nothing to do", r"has nothing to run"),
])
def test_bad_suite_files_name_the_field(tmp_path, text, message):
    path = write(tmp_path, "s.yaml", "name: x\n" + text)
    with pytest.raises(zoo.ZooConfigError, match=message):
        cases(load_suite(str(path)))


def test_builtin_suites_load_and_quick_shrinks_them():
    assert zoo_main(["bench", "nope", "--no-progress"]) == 2
    def cost(cs):  # cases, and training steps over the training cases
        return len(cs), sum(c.get("train", {}).get("max_steps", 0) for c in cs)

    for name in ("default", "speed", "decode", "quality", "extrapolation", "findings"):
        full, quick = cases(load_suite(name)), cases(load_suite(name, quick=True))
        (n_full, steps_full), (n_quick, steps_quick) = cost(full), cost(quick)
        assert full and quick and n_quick <= n_full and steps_quick <= steps_full, name
        assert (n_quick, steps_quick) != (n_full, steps_full), f"--quick changes nothing in {name}"
    assert {c["kind"] for c in cases(load_suite("default"))} == {"speed", "decode", "quality"}


def test_results_rows_are_single_lines(tmp_path):
    path = tmp_path / "r.jsonl"
    append_row(path, {"key": "a", "status": "ok", "text": "two\nlines"})
    assert len(path.read_text().splitlines()) == 1
    assert json.loads(path.read_text())["text"] == "two\nlines"
    assert Path(path).stat().st_size > 0


def test_loglog_slope_recovers_the_exponent_and_needs_two_lengths():
    import math

    from zoo.measure import loglog_slope

    xs = [256, 1024, 4096]
    assert loglog_slope(xs, [3 * x**1.5 for x in xs]) == pytest.approx(1.5)
    assert math.isnan(loglog_slope([1024, 1024], [1.0, 2.0]))


def test_a_second_sweep_into_a_live_folder_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    from zoo.errors import ZooConfigError
    from zoo.sweep import SweepLock

    results = tmp_path / "results.jsonl"
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "results.jsonl.lock").write_text(str(owner.pid))
        with pytest.raises(ZooConfigError, match=rf"being written by another zoo bench \(pid {owner.pid}"):
            SweepLock(results).__enter__()
    finally:
        owner.kill()
        owner.wait()
    with SweepLock(results):  # the owner is gone: its lock is stale and taken over
        assert (tmp_path / "results.jsonl.lock").read_text() == str(os.getpid())
    assert not (tmp_path / "results.jsonl.lock").exists()


def test_unreadable_lines_are_skipped_counted_and_reported(tmp_path):
    from zoo.sweep import SKIPPED

    good = {"key": "decode/x/T=1", "status": "ok", "case": {"kind": "decode", "mixer": "x", "context": 1},
            "result": {"seconds_per_token": 1e-4, "state_bytes": 8}, "env": {"torch": "x"}}
    (tmp_path / "results.jsonl").write_bytes(json.dumps(good).encode() + b"\n\xff\xfe not utf-8\n{\"no\": \"key\"}\n")
    SKIPPED.clear()
    rows = collect([tmp_path])
    assert [r["key"] for r in rows] == ["decode/x/T=1"] and SKIPPED == ["results.jsonl:2", "results.jsonl:3"]
    report = write_report(rows, tmp_path).read_text()
    assert "2 unreadable line(s) in the results were skipped" in report


def test_results_path_that_is_a_folder_is_an_error_before_any_case(tmp_path):
    from zoo.cli import main

    (tmp_path / "out" / "results.jsonl").mkdir(parents=True)
    assert main(["bench", "decode", "--out", str(tmp_path / "out"), "--no-progress"]) == 2


def test_a_timed_out_case_takes_its_children_with_it(tmp_path):
    """The case starts a grandchild (as a compile starts ninja) and hangs; after the timeout
    neither is left running."""
    import subprocess
    import sys
    import time

    from zoo.sweep import run_isolated

    pidfile = tmp_path / "child.pid"
    script = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
              f"open({str(pidfile)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    row = run_isolated({"key": "k"}, timeout=3, argv=[sys.executable, "-c", script])
    assert row["status"] == "timeout"
    pid = int(pidfile.read_text())
    time.sleep(0.2)
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    # gone, or a zombie ('Z', with ps's modifiers such as 'N' under nice): not running
    assert state == "" or state.startswith("Z"), f"the grandchild {pid} still runs ({state})"


def test_environment_names_the_machine():
    import platform

    from zoo.measure import environment

    env = environment("cpu")
    if os.path.exists("/proc/cpuinfo"):  # the model name, not the architecture word
        assert env["cpu"] and env["cpu"] != platform.machine() and env["device_name"] == env["cpu"]
    assert env["cores"] >= 1 and env["isa"] and env["threads"] >= 1 and "load" in env


def test_measurement_processes_keep_freed_memory_by_default_and_say_so(tmp_path):
    """A timing case runs under the allocator its suite names (default keep) and its row's env
    says which; training cases record it in env only, so their settings (and finished rows) do
    not change with it."""
    import subprocess
    import sys

    code = ("import json; from zoo import sweep; "
            "print(json.dumps(sweep.execute({'kind': 'speed', 'mixer': 'softmax', 'd_model': 16, 'args': {}, "
            "'length': 8, 'batch': 1, 'mode': 'forward', 'dtype': 'float32', 'threads': 1, 'allocator': %r})['env']))")
    for name, says in (("keep", "kept"), ("system", "glibc defaults")):
        out = subprocess.run([sys.executable, "-c", code % name], capture_output=True, text=True, check=True)
        assert says in json.loads(out.stdout.strip().splitlines()[-1])["allocator"]
    cs = cases(load_suite("default"))
    assert {c["allocator"] for c in cs if c["kind"] in ("speed", "decode")} == {"keep"}
    assert all("allocator" not in c for c in cs if c["kind"] == "quality")
    with pytest.raises(zoo.ZooConfigError, match=r"unknown train.allocator 'jemalloc'"):
        from zoo.config import TrainConfig
        TrainConfig(allocator="jemalloc")


def test_results_csv_is_written_beside_the_report(tmp_path):
    import csv

    rows = [{"key": "decode/x/T=1", "status": "ok", "case": {"kind": "decode", "mixer": "x", "context": 1},
             "result": {"seconds_per_token": 1e-4, "state_bytes": 8}, "env": {"torch": "x"}},
            {"key": "decode/y/T=1", "status": "error", "error": "boom | with a bar", "case": {"kind": "decode", "mixer": "y"}}]
    write_report(rows, tmp_path)
    table = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["key"] for r in table] == ["decode/x/T=1", "decode/y/T=1"]
    assert table[0]["result.seconds_per_token"] == "0.0001" and table[1]["error"] == "boom | with a bar"
    assert list(table[0])[:4] == ["key", "status", "case.kind", "case.mixer"]


def test_ctrl_c_says_what_is_kept_without_a_traceback(monkeypatch, capsys):
    import zoo.sweep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo.sweep, "run_suite", interrupted)
    assert zoo_main(["bench", "decode", "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "interrupted; finished cases are kept" in err and "Traceback" not in err


def test_flop_and_memory_counters_measure_known_amounts():
    """The counters the report quotes, on computations whose cost is known exactly."""
    from zoo.measure import count_flops, peak_rss_bytes, saved_tensor_bytes

    a, b = torch.randn(64, 32), torch.randn(32, 16)
    assert count_flops(lambda: a @ b) == 2 * 64 * 32 * 16
    w = torch.randn(1000, requires_grad=True)
    x = torch.randn(1000)
    assert saved_tensor_bytes(lambda: (w * x).sum()) == 1000 * 4  # mul saves x (w's grad needs it)
    assert saved_tensor_bytes(lambda: (w * 2.0).sum()) == 0  # a scalar factor saves nothing
    code = ("import torch; from zoo.measure import peak_rss_bytes; b = peak_rss_bytes(); "
            "x = torch.ones(256 * 2**20 // 4); print(peak_rss_bytes() - b)")  # 256 MiB, touched, in a fresh process
    import subprocess
    import sys

    grew = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 250 * 2**20 <= grew <= 300 * 2**20, grew
    assert peak_rss_bytes() > 0


def test_the_report_survives_rows_it_has_never_seen(tmp_path):
    """Odd rows (another version's, hand-edited, cut short) are listed with what they lack; the
    rest of the report is written; text cannot break its tables or its code block."""
    from zoo.report import compare

    speed = {"key": "speed/softmax/forward_backward/T=8", "status": "ok", "suite": "s",
             "case": {"kind": "speed", "mixer": "softmax", "length": 8, "mode": "forward_backward"},
             "result": {"seconds": 0.01, "tokens_per_s": 800.0}, "env": {"cpu": "x"}}
    odd = [
        {**speed, "key": "speed/no-env", "env": None},  # usable: the environment is optional
        {**speed, "key": "speed/zero", "result": {"seconds": 0, "tokens_per_s": 1.0}},
        {**speed, "key": "speed/inf", "result": {"seconds": 1.0, "tokens_per_s": float("inf")}},
        {**speed, "key": "speed/no-tps", "result": {"seconds": 1.0}},
        {"key": 5, "status": "ok", "case": {"kind": "speed"}},
        "not even a dict",
        {"key": "speed/failed", "status": "error", "case": {"kind": "speed"}, "error": "a | b\nc ``` d"},
    ]
    path = write_report([speed, *odd], tmp_path, command="zoo bench ``` `x` | y")
    text = path.read_text()
    assert "````\nzoo bench ``` `x` | y\n````" in text  # a fence longer than any run of backticks inside
    assert "| speed/failed | error | c ``` d |" in text.replace("a \\| b", "")  # the last error line
    unusable = text.split("## Rows the report could not use")[1]
    for name in ("speed/zero", "speed/inf", "speed/no-tps", "5:", "row 7"):
        assert name in unusable, name
    assert "speed/no-env" not in unusable
    for line in text.splitlines():  # every table row keeps its columns
        if line.startswith("| speed/failed"):
            assert line.count(" | ") == 2
    compared = compare([speed], [speed, odd[1]], tmp_path / "cmp", ("a", "b")).read_text()
    assert "1.000" in compared and "speed/zero: result.seconds=0" in compared


def test_the_newest_row_wins_across_shard_files_and_shards_are_not_redone(tmp_path):
    """A sharded run, then an unsharded one with other settings into the same folder: the rows
    finished last win whichever file holds them, and cases the shards finished with the same
    settings are not run again."""
    text = "speed: {mixers: [mlp, swiglu], lengths: [8], modes: [forward], d_model: 8}"
    suite = load_suite(str(write(tmp_path, "s.yaml", text)))
    out = tmp_path / "out"
    run_suite(suite, out, shard="0/2", progress=False)
    shard_rows = {r["key"]: r for r in collect([out])}
    run_suite(suite, out, progress=False)  # same settings: only the other shard's case runs
    assert len(read_rows(out / "results.jsonl")) == 1
    suite.threads = 1  # other settings: everything runs again, into results.jsonl
    run_suite(suite, out, progress=False)
    merged = {r["key"]: r for r in collect([out])}
    assert all(r["case"]["threads"] == 1 for r in merged.values())
    (key,) = shard_rows
    assert merged[key]["finished_at"] > shard_rows[key]["finished_at"]
    # file order no longer decides: the shard file sorts after results.jsonl, yet loses
    assert sorted(p.name for p in out.glob("results*.jsonl"))[-1].startswith("results.shard")


def test_every_registered_mixer_has_its_own_colour():
    from zoo.registry import CHANNEL, SEQUENCE, default_registry
    from zoo.report import mixer_color

    reg = default_registry()
    names = reg.names(SEQUENCE) + reg.names(CHANNEL)
    colours = {tuple(mixer_color(n)) for n in names}
    assert len(colours) == len(names)


def test_rerun_runs_finished_cases_again_and_the_new_rows_win(tmp_path):
    suite = load_suite(str(write(tmp_path, "s.yaml", "speed: {mixers: [mlp], lengths: [8], modes: [forward], d_model: 8}")))
    out = tmp_path / "out"
    run_suite(suite, out, progress=False)
    run_suite(suite, out, progress=False)  # finished: nothing runs
    assert len(read_rows(out / "results.jsonl")) == 1
    run_suite(suite, out, progress=False, rerun=True)
    rows = read_rows(out / "results.jsonl")
    assert len(rows) == 2 and collect([out])[0]["finished_at"] == max(r["finished_at"] for r in rows)


def test_rerun_pattern_list_and_contended_rows(tmp_path, capsys):
    """--rerun PATTERN redoes only the matching keys; --list shows every case's status and runs
    nothing; a timing flagged as contended counts as failed for --retry-failed and is marked in
    the report with the advice to rerun it."""
    suite = load_suite(str(write(tmp_path, "s.yaml", "speed: {mixers: [mlp, swiglu], lengths: [8], modes: [forward], "
                                                     "d_model: 8}")))
    out = tmp_path / "out"
    run_suite(suite, out, progress=False)
    rows = read_rows(out / "results.jsonl")
    assert len(rows) == 2 and all(isinstance(r["result"]["contended"], bool) for r in rows)
    assert all(r["result"]["utilisation"] > 0 and r["result"]["blocks"] >= 1 and "iqr_s" in r["result"] for r in rows)
    run_suite(suite, out, progress=False, rerun="speed/swiglu/*")
    keys = [r["key"] for r in read_rows(out / "results.jsonl")]
    assert len(keys) == 3 and keys[-1].startswith("speed/swiglu/")
    # the mlp row contended (as a busy machine makes it), the swiglu row not, whatever this machine
    # did meanwhile: --list says so, --retry-failed redoes the flagged one only
    latest = {r["key"]: r for r in collect([out])}
    with open(out / "results.jsonl", "a") as f:
        for key, row in latest.items():
            busy = key.startswith("speed/mlp/")
            row["result"].update(contended=busy, utilisation=0.31 if busy else 0.97)
            row["finished_at"] += 1e-3
            f.write(json.dumps(row) + "\n")
    assert zoo_main(["bench", str(tmp_path / "s.yaml"), "--out", str(out), "--list"]) == 0
    listed = capsys.readouterr().out
    assert "contended  speed/mlp/" in listed and "ok         speed/swiglu/" in listed and "2 cases" in listed
    report = write_report(collect([out]), out).read_text()
    assert " †" in report and "1 timing measured under contention" in report and "--retry-failed" in report
    run_suite(suite, out, progress=False)  # a plain resume keeps the flagged row
    assert len(read_rows(out / "results.jsonl")) == 5
    run_suite(suite, out, progress=False, retry_failed=True)
    rows = read_rows(out / "results.jsonl")
    assert len(rows) == 6 and rows[-1]["key"].startswith("speed/mlp/") and rows[-1]["result"]["utilisation"] != 0.31
    assert {r["key"]: r for r in collect([out])}[rows[-1]["key"]]["finished_at"] == rows[-1]["finished_at"]


@pytest.mark.parametrize("cluster", ["debug", "local"])
def test_submitit_runs_the_cases_and_the_report_says_where(tmp_path, cluster):
    """The same suite through submitit (debug: in this process; local: its executor's own
    processes, the code path a SLURM array takes) gives the same rows as a plain sweep, each with
    its job; resume skips them, and the report lists where the cases ran."""
    pytest.importorskip("submitit")
    from zoo.sweep import SubmititRunner

    suite = load_suite(str(write(tmp_path, "s.yaml", "speed: {mixers: [mlp, swiglu], lengths: [8], modes: [forward], "
                                                     "d_model: 8}")))
    out = tmp_path / "out"
    run_suite(suite, out, progress=False, jobs=2, runner=SubmititRunner(cluster, tmp_path / "jobs", timeout=120))
    rows = read_rows(out / "results.jsonl")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert all(r["ran_on"]["executor"] == f"submitit-{cluster}" and r["ran_on"]["job_id"] for r in rows)
    assert all(r["result"]["tokens_per_s"] > 0 and r["env"]["host"] for r in rows)
    run_suite(suite, out, progress=False)  # resume: nothing left
    assert len(read_rows(out / "results.jsonl")) == 2
    report = write_report(collect([out]), out).read_text()
    assert "Where the cases ran" in report and f"submitit-{cluster}" in report


def test_submitit_errors_name_what_is_wrong(tmp_path):
    pytest.importorskip("submitit")
    from zoo.sweep import SubmititRunner

    with pytest.raises(zoo.ZooConfigError, match=r"unknown submitit cluster 'slrum'.*slurm"):
        SubmititRunner("slrum", tmp_path)
    assert zoo_main(["bench", "default", "--submitit", "local", "--submitit-args", "[1, 2]",
                     "--out", str(tmp_path / "o")]) == 2


def test_forked_cases_report_like_fresh_interpreters():
    """The fork-server launcher (the default on Linux) gives the same kinds of rows as a new
    interpreter per case: a result, an error row naming the problem, and a timeout that takes
    the case's whole session down."""
    import subprocess
    import time

    from zoo.sweep import forkserver_available, run_forked, run_isolated

    if not forkserver_available():
        pytest.skip("no fork server on this platform")
    case = {"key": "speed/mlp/x", "kind": "speed", "mixer": "mlp", "d_model": 16, "args": {}, "length": 8,
            "batch": 1, "mode": "forward", "dtype": "float32", "threads": 1}
    forked, fresh = run_forked(case, 120), run_isolated(case, 120)
    assert forked["status"] == fresh["status"] == "ok"
    assert set(forked["result"]) == set(fresh["result"]) and forked["env"]["threads"] == 1
    assert forked["env"]["launcher"] == "forkserver" and fresh["env"]["launcher"] == "subprocess"
    from zoo.measure import code_revision

    assert forked["env"]["git"] == fresh["env"]["git"] == code_revision() != ""  # the code that ran
    bad = run_forked({**case, "mixer": "nope"}, 120)
    assert bad["status"] == "error" and "unknown mixer 'nope'" in bad["error"]
    slow = {"key": "q", "kind": "quality", "mixer": "softmax", "task": "mqar", "threads": 1,
            "task_args": {"vocab": 16, "seq_len": 16, "n_pairs": 2}, "model": {"d_model": 16, "n_layers": 1},
            "train": {"max_steps": 100000, "val_every": 100000}}
    row = run_forked(slow, 5)
    assert row["status"] == "timeout" and row["error"] == "no result within 5 s"
    from multiprocessing import forkserver

    server = forkserver._forkserver._forkserver_pid
    time.sleep(0.5)  # the server reaps its killed child
    children = subprocess.run(["pgrep", "-P", str(server)], capture_output=True, text=True).stdout.split()
    assert children == [], f"case processes left under the fork server: {children}"


def test_the_fork_server_preloads_every_registered_class():
    """A case forked from the sweep's server must run the code of the sweep's start throughout:
    a module it imported only at case time would come from the checkout as edited since, beside
    preloaded modules of the old code. So zoo.preload imports every class the registry names."""
    import subprocess
    import sys

    code = ("import sys, zoo.preload; from zoo.registry import KINDS, default_registry; "
            "print([e.class_path for k in KINDS for e in default_registry().entries(k) "
            "if e.class_path and e.class_path.rsplit('.', 1)[0] not in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"


KILLED_SWEEP = """
import subprocess, sys, threading, time
from multiprocessing import forkserver
from zoo.sweep import run_forked
case = {"key": "q", "kind": "quality", "mixer": "softmax", "task": "mqar", "threads": 1,
        "task_args": {"vocab": 16, "seq_len": 16, "n_pairs": 2}, "model": {"d_model": 16, "n_layers": 1},
        "train": {"max_steps": 10 ** 7, "val_every": 10 ** 7}}
if __name__ == "__main__":  # the fork server imports this module again
    threading.Thread(target=run_forked, args=(case, 600), daemon=True).start()
    while True:
        server = forkserver._forkserver._forkserver_pid
        kids = subprocess.run(["pgrep", "-P", str(server)], capture_output=True, text=True).stdout.split() if server else []
        if kids:
            print("CASE", kids[0], flush=True)
            time.sleep(600)
        time.sleep(0.2)
"""


def test_a_killed_sweep_takes_its_forked_case_with_it(tmp_path):
    """kill -9 of a sweep must not leave its case training on: the fork server outlives the
    sweep while a case holds its pipe, so the case watches the sweep itself."""
    import subprocess
    import sys
    import time

    from zoo.sweep import _running, forkserver_available

    if not forkserver_available():
        pytest.skip("no fork server on this platform")
    script = tmp_path / "sweep.py"
    script.write_text(KILLED_SWEEP)
    sweep = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = sweep.stdout.readline()
        assert line.startswith("CASE "), line
        case = int(line.split()[1])
        assert _running(case)
    finally:
        sweep.kill()
        sweep.wait()
    deadline = time.monotonic() + 20
    while _running(case) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(case), f"case {case} still running after its sweep was killed"


def test_peak_memory_is_the_cases_own_whatever_came_before():
    """A transient 400 MB earlier in the process (freed back to the system) does not hide the
    case's own peak: the high-water mark is reset to the current resident memory first."""
    import subprocess
    import sys

    code = ("import json, torch; from zoo import measure; x = torch.ones(100_000_000); del x; "
            "print(json.dumps(measure.measure_speed({'mixer': 'softmax', 'd_model': 64, 'args': {}, 'length': 512, "
            "'batch': 4, 'mode': 'forward_backward', 'dtype': 'float32'})['peak_bytes']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak = json.loads(out.stdout.strip().splitlines()[-1])
    assert 1e6 < peak < 4e8, peak  # the case's attention scores and activations, not 0 and not the 400 MB


def test_parallel_cases_get_a_gpu_each_on_a_multi_gpu_host(tmp_path, monkeypatch, capsys):
    """Two GPUs and --jobs 3: two cases at a time, each with its own CUDA_VISIBLE_DEVICES (seen
    by the case process itself), a GPU handed on when its case ends. (The GPU count is faked;
    the cases run on this CPU.)"""
    from zoo import sweep

    monkeypatch.setattr(sweep, "_gpu_count", lambda: 2)
    suite = load_suite(str(write(tmp_path, "s.yaml", """
    quality:
      mixers: [softmax, linear, mamba]
      tasks: {mqar: {vocab: 16, seq_len: 16, n_pairs: 1, train_size: 64, test_size: 16}}
      model: {d_model: 16, n_layers: 1}
      train: {max_steps: 4, val_every: 4, batch_size: 8}
    """)))
    rows = read_rows(run_suite(suite, tmp_path / "out", progress=False, jobs=3))
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    assert all(r["visible_devices"] in ("0", "1") and r["env"]["cuda_visible_devices"] == r["visible_devices"]
               for r in rows)
    assert "--jobs 3 on 2 GPUs: 2 cases at a time" in capsys.readouterr().err


def test_two_jobs_give_the_same_rows_as_one_at_the_same_thread_count(tmp_path):
    """--jobs 2 runs the cases two at a time and gets the same metrics, bit for bit, as --jobs 1
    when each case has the same threads (a different thread count changes float reductions,
    so the suite or --threads fixes it for comparisons)."""
    text = """
    threads: 1
    quality:
      mixers: [softmax, linear, mamba, retnet]
      tasks: {mqar: {vocab: 16, seq_len: 16, n_pairs: 1, train_size: 64, test_size: 32}}
      model: {d_model: 16, n_layers: 1}
      train: {max_steps: 6, val_every: 3, batch_size: 8}
    """
    suite = load_suite(str(write(tmp_path, "s.yaml", text)))
    one = {r["key"]: r for r in read_rows(run_suite(suite, tmp_path / "one", progress=False, jobs=1))}
    two = {r["key"]: r for r in read_rows(run_suite(suite, tmp_path / "two", progress=False, jobs=2))}
    assert set(one) == set(two) and len(one) == 4
    for key in one:
        assert one[key]["result"]["metrics"] == two[key]["result"]["metrics"], key
        assert one[key]["result"]["loss_curve"] == two[key]["result"]["loss_curve"], key


def test_report_names_every_command_behind_its_rows(tmp_path):
    """A results folder filled by a run and a later --rerun of some cases: the report says both,
    with how many cases each produced, not only the last."""
    def row(key, command):
        return {"key": key, "status": "ok", "command": command, "env": {"torch": "x"},
                "case": {"kind": "decode", "mixer": "x", "context": 1},
                "result": {"seconds_per_token": 1e-4, "state_bytes": 8}}
    rows = [row("decode/x/T=1", "zoo bench decode"), row("decode/x/T=2", "zoo bench decode"),
            row("decode/y/T=1", "zoo bench decode --rerun 'decode/y/*'")]
    report = write_report(rows, tmp_path).read_text()
    assert "zoo bench decode   # 2 cases" in report and "--rerun 'decode/y/*'   # 1 case" in report
    one = write_report(rows[:2], tmp_path / "one").read_text()
    assert "Produced by:" in one and "# 2 cases" not in one


def test_compute_time_sums_wall_times_and_counts_overlapping_runs_once():
    """Two one-hour runs overlapping by half an hour, a third a day later for half an hour:
    2.5 process-hours over 2.0 hours with a run going (the day between is not counted)."""
    from zoo.report import compute_time
    h = 3600.0
    ok = [{"wall_s": h, "finished_at": 10 * h}, {"wall_s": h, "finished_at": 10.5 * h},
          {"wall_s": 0.5 * h, "finished_at": 40 * h}, {"status": "ok"}]
    text = compute_time(ok)
    assert "2.5 h of process time for the 4 finished cases" in text
    assert "over 2.0 h in which" in text
