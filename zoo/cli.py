"""The ``zoo`` command: ``zoo list``, ``zoo fit``, ``zoo test``, ``zoo bench``, ``zoo report``."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections import Counter
from pathlib import Path

import torch
import yaml

from zoo.errors import ZooConfigError, ZooDiverged, read_yaml
from zoo.registry import CHANNEL, ENV_VAR, POSITION_SCHEMES, SEQUENCE, TASKS, Registry, default_registry, hyper_defaults


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def _causal(e) -> str:
    """'strict' (no output depends on a later input's value), 'mask only' (masked, but later
    inputs still move the result: refused by causal models unless allowed), or '-'."""
    return ("strict" if e.strictly_causal else "mask only") if e.causal else "-"


def list_table(reg: Registry, device_type: str) -> str:
    """Markdown tables of every registry entry and which backends run on ``device_type``."""

    def backends(e) -> str:
        parts = []
        for name, why in e.available_backends(device_type).items():
            parts.append(name if not why else f"({name}: {why})")
        return ", ".join(parts)

    lines = [f"## Sequence mixers (backends on {device_type}; parenthesised ones are unavailable)", "",
             "causal: strict = no output depends on a later input's value; mask only = the future is masked but "
             "later inputs still change earlier outputs (refused by causal models unless "
             "model.allow_causal_leak is true)", "",
             "| name | causal | bidirectional | decode | positions | backends | description |",
             "|---|---|---|---|---|---|---|"]
    for e in reg.entries(SEQUENCE):
        lines.append(
            f"| {e.name} | {_causal(e)} | {_yes(e.bidirectional)} | {_yes(e.decode)} | "
            f"{', '.join(e.positions)} | {backends(e)} | {e.description} |"
        )
    lines += ["", "## Papers and growth (as the papers state them)", "",
              "| name | paper | complexity |", "|---|---|---|"]
    for e in reg.entries(SEQUENCE) + reg.entries(CHANNEL):
        growth = "; ".join(f"{k} {v}" for k, v in e.complexity.items()) or "-"
        lines.append(f"| {e.name} | {e.paper or '-'} | {growth} |")
    lines += ["", "## Hyper-parameters and their defaults (set them in model.mixer_args / channel_args)", "",
              "| name | defaults |", "|---|---|"]
    model_sets = {"causal", "position", "backend"}  # chosen by the model config, not per mixer
    for e in reg.entries(SEQUENCE) + reg.entries(CHANNEL):
        hyper = {k: v for k, v in hyper_defaults(e.cls, e.defaults).items() if k not in model_sets}
        lines.append(f"| {e.name} | {', '.join(f'{k}={v}' for k, v in hyper.items()) or '-'} |")
    lines += ["", "## Channel mixers", "", "| name | backends | description |", "|---|---|---|"]
    for e in reg.entries(CHANNEL):
        lines.append(f"| {e.name} | {backends(e)} | {e.description} |")
    lines += ["", "## Positional schemes", "", "| name | where | description |", "|---|---|---|"]
    for e in reg.entries(POSITION_SCHEMES):
        lines.append(f"| {e.name} | {e.where} | {e.description} |")
    lines += ["", "## Tasks", "", "| name | metric | defaults | description |", "|---|---|---|---|"]
    for e in reg.entries(TASKS):
        defaults = ", ".join(f"{k}={v}" for k, v in hyper_defaults(e.cls, e.defaults).items())
        lines.append(f"| {e.name} | {e.metric} | {defaults} | {e.description} |")
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(list_table(default_registry(), device))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from zoo.config import Config, apply_overrides, dump_config, from_dict
    from zoo.train import checkpoint_config, fit, resolve

    data: dict = {}
    if args.resume and not args.config:  # the checkpoint's own config and run folder
        data = checkpoint_config(args.resume)
    if args.config:
        data = read_yaml(args.config, "config file") or {}
    cfg = from_dict(Config, apply_overrides(data, args.overrides), where=args.config or "config")
    if args.print_config:  # the task's own defaults included
        resolved, _ = resolve(cfg)
        entry = default_registry().get(TASKS, resolved.task.name)
        resolved.task.args = {**entry.defaults, **resolved.task.args}
        print(dump_config(resolved), end="")
        return 0
    out = fit(cfg, resume=args.resume)
    print(json.dumps(out, indent=2))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from zoo.train import evaluate

    print(json.dumps(evaluate(args.checkpoint, split=args.split), indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from zoo.findings import not_needed
    from zoo.report import write_report
    from zoo.suite import load_suite
    from zoo.sweep import collect, run_suite

    suite = load_suite(args.suite, quick=args.quick)
    if args.threads:
        suite.threads = args.threads
    if args.timeout:
        suite.timeout = args.timeout
    out = Path(args.out or Path("bench-results") / (suite.name + ("-quick" if args.quick else "")))
    if args.list:
        from zoo.sweep import case_status

        listed = case_status(suite, out)
        for key, status in listed:
            print(f"{status:10s} {key}")
        counts = ", ".join(f"{n} {s}" for s, n in sorted(Counter(s for _, s in listed).items()))
        print(f"{len(listed)} cases ({counts}); results folder {out}")
        return 0
    command = args.command_line
    runner = None
    if args.submitit:
        from zoo.sweep import SubmititRunner

        params = yaml.safe_load(args.submitit_args) if args.submitit_args else {}
        if not isinstance(params, dict):
            raise ZooConfigError(f"--submitit-args must be a mapping, e.g. '{{slurm_partition: gpu}}'; got "
                                 f"{args.submitit_args!r}")
        runner = SubmititRunner(args.submitit, out / "submitit", params, suite.timeout)
    elif args.launcher != "auto":
        from zoo.sweep import run_forked, run_isolated

        runner = run_isolated if args.launcher == "subprocess" else run_forked
    results = run_suite(suite, out, shard=args.shard, retry_failed=args.retry_failed, rerun=args.rerun,
                        progress=not args.no_progress, command=command, jobs=args.jobs, runner=runner)
    rows = collect([results])
    failed = [r for r in rows if r.get("status") not in ("ok", "skipped")]
    skipped = sum(r.get("status") == "skipped" for r in rows)
    print(f"{len(rows) - len(failed) - skipped} cases ok, {len(failed)} did not finish"
          + (f", {skipped} not needed ({not_needed(rows)})" if skipped else "") + f"; results in {results}")
    if args.shard and args.shard != "0/1":
        print(f"shard done; merge with: zoo report {out}")
        return 0
    report = write_report(rows, out, command=command)
    print(f"report: {report}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from zoo.report import compare, write_report
    from zoo.sweep import collect

    if args.compare:
        if len(args.paths) != 2:
            raise ZooConfigError("--compare takes exactly two result sets: zoo report A B --compare")
        out = Path(args.out or Path(args.paths[1]).parent)  # beside the inputs, not wherever we stand
        runs = [Path(p) / "metrics.json" for p in args.paths]
        if all(r.is_file() for r in runs):  # two `zoo fit` runs
            from zoo.report import compare_runs

            path = compare_runs(args.paths, out)
        else:
            a, b = (collect([p]) for p in args.paths)
            empty = [p for p, rows in zip(args.paths, (a, b), strict=True) if not rows]
            if empty:
                raise ZooConfigError(
                    f"--compare: {', '.join(empty)} holds neither zoo bench results (results*.jsonl) nor a zoo fit "
                    "run (metrics.json); give two bench result folders or two run folders")
            path = compare(a, b, out, tuple(args.paths))
    else:
        rows = collect(args.paths)
        if not rows:
            raise ZooConfigError(f"no results found in {', '.join(args.paths)} (looked for results*.jsonl)")
        path = write_report(rows, Path(args.out or (args.paths[0] if Path(args.paths[0]).is_dir() else ".")))
    print(f"report: {path}")
    return 0


def config_keys() -> str:
    """Every key `zoo fit` takes as --section.key, with its default (the epilog of `zoo fit --help`)."""
    import dataclasses

    from zoo.config import Config

    lines = ["config keys (--section.key VALUE; VALUE read as YAML):"]
    for section in dataclasses.fields(Config):
        cls = section.default_factory
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{section.name}.{f.name} (default: {default!r})")
    lines.append("  --task.args.KEY: a task's own arguments (zoo list shows each task's defaults)")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    from zoo.suite import builtin_suites

    p = argparse.ArgumentParser(prog="zoo", description=__doc__)
    p.add_argument(
        "--registry", action="append", default=[], metavar="FILE",
        help=f"a registry overlay YAML (repeatable; also ${ENV_VAR}, joined by '{os.pathsep}')",
    )
    # --registry also after the subcommand (zoo list --registry F), under its own name: argparse
    # would let a subcommand's default overwrite the value given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", action="append", default=[], dest="registry_after", metavar="FILE",
                        help="a registry overlay YAML (repeatable), as before the subcommand")
    sub = p.add_subparsers(dest="command", required=True)
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: add_parser(*a, parents=[common], **k)  # noqa: E731
    s = sub.add_parser("list", help="every registry entry, its capabilities and available backends")
    s.set_defaults(func=cmd_list)
    s = sub.add_parser("fit", help="train and test one config (Lightning)",
                       description="Train and test one config. Overrides: --model.mixer window --train.max_steps 100 "
                                   "--task.name selective_copy --task.args.seq_len 128 (values read as YAML).",
                       epilog=config_keys(), formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--config", help="a YAML file with model, task and train sections")
    s.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (e.g. runs/NAME/checkpoints/last.ckpt)")
    s.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    s.set_defaults(func=cmd_fit)
    s = sub.add_parser("test", help="evaluate a checkpoint on its task's test sets (or validation set)",
                       description="Rebuild the model and task from the checkpoint's own config and print "
                                   "their metrics as JSON; writes nothing.")
    s.add_argument("checkpoint", help="a checkpoint written by zoo fit (runs/NAME/checkpoints/last.ckpt)")
    s.add_argument("--split", default="test", help="test (every test set of the task) or val")
    s.set_defaults(func=cmd_test)
    s = sub.add_parser("bench", help="run a benchmark suite and write its report",
                       description=f"Run a suite (built-in: {', '.join(builtin_suites())}; or a YAML path), one "
                                   "process per case, appending to results.jsonl; a rerun resumes.")
    s.add_argument("suite", nargs="?", default="default")
    s.add_argument("--quick", action="store_true", help="the suite's quick variant")
    s.add_argument("--out", help="results directory (default bench-results/SUITE)")
    s.add_argument("--shard", help="i/n: run every n-th case starting at i")
    s.add_argument("--retry-failed", action="store_true",
                   help="rerun cases whose row says error/timeout/killed, or whose timing was measured "
                        "under contention")
    s.add_argument("--rerun", nargs="?", const=True, default=False, metavar="PATTERN",
                   help="run the cases again, finished or not: every case, or those whose key matches the shell "
                        "pattern (e.g. 'speed/window/*'); the new rows win, the old stay in the file")
    s.add_argument("--list", action="store_true",
                   help="list the suite's cases and their status in the results folder; "
                        "run nothing")
    s.add_argument("--threads", type=int, default=0,
                   help="torch threads per case (default: the suite's, else the cores shared among --jobs)")
    s.add_argument("--jobs", type=int, default=1,
                   help="training cases run this many at a time (timing cases always run alone)")
    s.add_argument("--timeout", type=int, default=0, help="seconds per case (default: the suite's)")
    s.add_argument("--launcher", choices=["auto", "forkserver", "subprocess"], default="auto",
                   help="how each case gets its fresh process: forked from a server that imported torch and the "
                        "zoo once, or a new interpreter (python -m zoo.sweep CASE); auto (default): training "
                        "cases forked (Linux), timing cases a new interpreter (their memory peaks stay comparable)")
    s.add_argument("--submitit", metavar="CLUSTER",
                   help="run the cases as submitit jobs: slurm (a cluster; results on a shared filesystem), "
                        "local (submitit's executor on this machine) or debug (in this process)")
    s.add_argument("--submitit-args", metavar="YAML",
                   help="submitit executor parameters, e.g. '{slurm_partition: gpu, gpus_per_node: 1}'")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_bench)
    s = sub.add_parser("report", help="write report.md (and plots) from result files or directories")
    s.add_argument("paths", nargs="+")
    s.add_argument("--out", help="where report.md goes (default: the first directory)")
    s.add_argument("--compare", action="store_true", help="two result sets: B's numbers as ratios to A's")
    s.set_defaults(func=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = parser().parse_known_args(argv)
    # what reproduces this run, whichever way it was started (zoo, python -m zoo, main([...]))
    args.command_line = "zoo " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    if args.command == "fit":
        args.overrides = rest
    elif rest:
        parser().error(f"unrecognized arguments: {' '.join(rest)}")
    before = os.environ.get(ENV_VAR)
    args.registry = [*args.registry, *args.registry_after]
    if args.registry:  # through the environment, so that subprocesses see the same registry
        paths = [os.path.abspath(p) for p in args.registry]
        os.environ[ENV_VAR] = os.pathsep.join(filter(None, [before, *paths]))
    try:
        return args.func(args)
    except ZooConfigError as e:
        print(f"zoo: error: {e}", file=sys.stderr)
        return 2
    except ZooDiverged as e:
        print(f"zoo: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # Ctrl-C: what was finished is on disk; say so, no traceback
        what = ("finished cases are kept in the results file; rerun the same command to resume"
                if args.command == "bench" else "the last checkpoint, if any, is in the run folder")
        print(f"zoo: interrupted; {what}", file=sys.stderr)
        return 130
    finally:
        if before is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = before


if __name__ == "__main__":
    sys.exit(main())
