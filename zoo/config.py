"""Typed configs. A config is plain data: it round-trips through YAML and rejects unknown keys.

    model:
      mixer: softmax            # or a list cycled over the layers: [mamba, mamba, softmax]
      mixer_args: {n_heads: 4}  # keys go to every mixer that takes them; a mixer's own name
                                # as key ({softmax: {n_heads: 4}}) targets that mixer only
      channel: mlp
      d_model: 128
      n_layers: 2
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from zoo.errors import ZooConfigError, unknown


@dataclass
class ModelConfig:
    """One whole model: embedding -> [Block x n_layers] -> head."""

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    mixer: Union[str, list[str]] = "softmax"  # noqa: UP007 (read by get_type_hints on 3.10)
    mixer_args: dict[str, Any] = field(default_factory=dict)
    channel: Union[str, list[str]] = "mlp"  # noqa: UP007
    channel_args: dict[str, Any] = field(default_factory=dict)
    causal: bool = True
    position: str = "none"  # none | sinusoidal | learned | rope | alibi
    max_len: int = 2048  # bounds sinusoidal/learned tables only
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_position: str = "pre"  # pre | post
    dropout: float = 0.0
    head: str = "lm"  # lm | classify
    tie_weights: bool = True  # lm head shares the embedding matrix
    n_classes: int = 0  # classify head only
    pool: str = "mean"  # classify head: mean | last | first

    CHOICES: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "norm": ("layernorm", "rmsnorm"),
        "norm_position": ("pre", "post"),
        "head": ("lm", "classify"),
        "pool": ("mean", "last", "first"),
    }

    def __post_init__(self) -> None:
        for key, allowed in self.CHOICES.items():
            if getattr(self, key) not in allowed:
                raise unknown(f"value of model.{key}", getattr(self, key), allowed)
        for key in ("vocab_size", "d_model", "n_layers", "max_len"):
            if getattr(self, key) < 1:
                raise ZooConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ZooConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.head == "classify" and self.n_classes < 2:
            raise ZooConfigError(f"model.n_classes must be >= 2 for head 'classify', got {self.n_classes}")
        for key in ("mixer", "channel"):
            if isinstance(getattr(self, key), list) and not getattr(self, key):
                raise ZooConfigError(f"model.{key} is an empty list; give a name or a list of names")

    @property
    def mixers(self) -> list[str]:
        """The sequence mixer of each layer (a list pattern is cycled over the layers)."""
        return _cycle(self.mixer, self.n_layers)

    @property
    def channels(self) -> list[str]:
        return _cycle(self.channel, self.n_layers)


@dataclass
class Config:
    """Everything one run needs. Later sections (task, train) join here."""

    model: ModelConfig = field(default_factory=ModelConfig)


def _cycle(pattern: str | list[str], n: int) -> list[str]:
    names = [pattern] if isinstance(pattern, str) else list(pattern)
    return [names[i % len(names)] for i in range(n)]


# -- dict / YAML conversion ------------------------------------------------------------------
def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    where = where or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ZooConfigError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise unknown("key", key, names, where)
        kwargs[key] = _coerce(hints[key], value, f"{where}.{key}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, where)
            except ZooConfigError:
                continue
        names = " or ".join(_type_name(t) for t in typing.get_args(tp))
        raise ZooConfigError(f"{where} must be {names}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ZooConfigError(f"{where} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ZooConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ZooConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def load_config(path: str | Path) -> Config:
    """Read a run config from YAML: sections named as in :class:`Config` (``model:``)."""
    path = Path(path)
    if not path.is_file():
        raise ZooConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ZooConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
    return from_dict(Config, data, where=path.name)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
