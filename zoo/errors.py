"""The zoo's one error type for bad input, and the "did you mean" helper its messages use."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class ZooConfigError(ValueError):
    """A bad config, name, value or file. The message names what is wrong and what is allowed."""


class ZooDiverged(RuntimeError):
    """Training stopped because the loss became non-finite (NaN or inf)."""

    def __init__(self, step: int, loss: float, run_dir: str = ""):
        self.step, self.loss, self.run_dir = step, loss, run_dir
        where = f" (run {run_dir})" if run_dir else ""
        super().__init__(f"training diverged: the loss is {loss} at step {step}{where}; lower train.lr, "
                         "raise train.warmup_steps or set train.grad_clip")


def unknown(what: str, name: object, allowed: Iterable[str], where: str = "") -> ZooConfigError:
    """Build the error for an unknown name: suggests the closest allowed names, lists them all."""
    allowed = sorted(allowed)
    close = difflib.get_close_matches(str(name), allowed, n=3, cutoff=0.5)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    at = f" in {where}" if where else ""
    return ZooConfigError(
        f"unknown {what} {name!r}{at}{hint}. Allowed: {', '.join(allowed) or '(none)'}"
    )


def at_least(what: str, minimum: int, **values: object) -> None:
    """Raise a ZooConfigError naming every value of ``values`` below ``minimum`` (or not an int)."""
    bad = {k: v for k, v in values.items() if isinstance(v, bool) or not isinstance(v, int) or v < minimum}
    if bad:
        got = ", ".join(f"{k}={v!r}" for k, v in bad.items())
        raise ZooConfigError(f"{what} needs {' and '.join(values)} to be integers >= {minimum}; got {got}")


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed YAML of ``path`` (None when empty); a missing file or bad YAML is a
    ZooConfigError that names ``what`` the file is (config file, suite file, ...)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ZooConfigError(f"{what} {str(path)!r} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ZooConfigError(f"{what} {str(path)!r} is not valid YAML: {e}") from e
