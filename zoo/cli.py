"""The ``zoo`` command: ``zoo list``, ``zoo fit`` (and, as they land, ``bench``, ``report``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import yaml

from zoo.errors import ZooConfigError
from zoo.registry import CHANNEL, ENV_VAR, POSITIONS, SEQUENCE, TASKS, Registry, default_registry


def _yes(flag: bool) -> str:
    return "yes" if flag else "-"


def list_table(reg: Registry, device_type: str) -> str:
    """Markdown tables of every registry entry and which backends run on ``device_type``."""

    def backends(e) -> str:
        parts = []
        for name, why in e.available_backends(device_type).items():
            parts.append(name if not why else f"({name}: {why})")
        return ", ".join(parts)

    lines = [f"## Sequence mixers (backends on {device_type}; parenthesised ones are unavailable)", "",
             "| name | causal | bidirectional | decode | positions | backends | description |",
             "|---|---|---|---|---|---|---|"]
    for e in reg.entries(SEQUENCE):
        lines.append(
            f"| {e.name} | {_yes(e.causal)} | {_yes(e.bidirectional)} | {_yes(e.decode)} | "
            f"{', '.join(e.positions)} | {backends(e)} | {e.description} |"
        )
    lines += ["", "## Channel mixers", "", "| name | backends | description |", "|---|---|---|"]
    for e in reg.entries(CHANNEL):
        lines.append(f"| {e.name} | {backends(e)} | {e.description} |")
    lines += ["", "## Positional schemes", "", "| name | where | description |", "|---|---|---|"]
    for e in reg.entries(POSITIONS):
        lines.append(f"| {e.name} | {e.where} | {e.description} |")
    lines += ["", "## Tasks", "", "| name | metric | defaults | description |", "|---|---|---|---|"]
    for e in reg.entries(TASKS):
        defaults = ", ".join(f"{k}={v}" for k, v in e.defaults.items())
        lines.append(f"| {e.name} | {e.metric} | {defaults} | {e.description} |")
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(list_table(default_registry(), device))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from zoo.config import Config, apply_overrides, dump_config, from_dict
    from zoo.train import fit, resolve

    data: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ZooConfigError(f"config file {args.config!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ZooConfigError(f"config file {args.config!r} is not valid YAML: {e}") from e
    cfg = from_dict(Config, apply_overrides(data, args.overrides), where=args.config or "config")
    if args.print_config:
        print(dump_config(resolve(cfg)[0]), end="")
        return 0
    out = fit(cfg, resume=args.resume)
    print(json.dumps(out, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo", description=__doc__)
    p.add_argument(
        "--registry", action="append", default=[], metavar="FILE",
        help=f"a registry overlay YAML (repeatable; also ${ENV_VAR}, joined by '{os.pathsep}')",
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("list", help="every registry entry, its capabilities and available backends")
    s.set_defaults(func=cmd_list)
    s = sub.add_parser("fit", help="train and test one config (Lightning)",
                       description="Train and test one config. Overrides: --model.mixer window --train.max_steps 100 "
                                   "--task.name selective_copy --task.args.seq_len 128 (values read as YAML).")
    s.add_argument("--config", help="a YAML file with model, task and train sections")
    s.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (e.g. runs/NAME/checkpoints/last.ckpt)")
    s.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    s.set_defaults(func=cmd_fit)
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = parser().parse_known_args(argv)
    if args.command == "fit":
        args.overrides = rest
    elif rest:
        parser().error(f"unrecognized arguments: {' '.join(rest)}")
    before = os.environ.get(ENV_VAR)
    if args.registry:  # through the environment, so that subprocesses see the same registry
        paths = [os.path.abspath(p) for p in args.registry]
        os.environ[ENV_VAR] = os.pathsep.join(filter(None, [before, *paths]))
    try:
        return args.func(args)
    except ZooConfigError as e:
        print(f"zoo: error: {e}", file=sys.stderr)
        return 2
    finally:
        if before is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = before


if __name__ == "__main__":
    sys.exit(main())
