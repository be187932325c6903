"""Typed configs. A config is plain data: it round-trips through YAML and rejects unknown keys.

    model:
      mixer: softmax            # or a list cycled over the layers: [mamba, mamba, softmax]
      mixer_args: {n_heads: 4}  # keys go to every mixer that takes them; a mixer's own name
                                # as key ({softmax: {n_heads: 4}}) targets that mixer only and
                                # is ignored while that mixer is not in the model, so one file
                                # can hold every mixer's settings for `--model.mixer X` sweeps
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

from zoo.errors import ZooConfigError, read_yaml, unknown


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
    # take mixers whose causal mode leaks later inputs' values (lsh; moe with capacity_rule batch)
    allow_causal_leak: bool = False
    # auto | none | sinusoidal | learned | rope | alibi. auto: the registry's default_position of
    # the model's sequence mixers (learned for attention, none for mamba; hybrids take the first
    # that is not none); resolved when the model is built and written into the run's config
    position: str = "auto"
    max_len: int = 2048  # bounds sinusoidal/learned tables only
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_position: str = "pre"  # pre | post
    dropout: float = 0.0
    head: str = "lm"  # lm | classify | reconstruct (the task sets it; reconstruct: MAD's compression decoder)
    # Initial scale of the token and learned-position embeddings: 1 (PyTorch's nn.Embedding) is on
    # the scale of sinusoidal positions and of what the blocks add under PyTorch's Linear init;
    # GPT-2's 0.02 left token identity ~25x below the first block's output, and attention then sat
    # on MQAR's plateau in every seed tried (docs/findings.md)
    embed_std: float = 1.0
    tie_weights: bool = False  # lm head shares the embedding matrix (then logits scale with embed_std)
    n_classes: int = 0  # classify head only
    pool: str = "mean"  # classify head: mean | last | first

    CHOICES: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "norm": ("layernorm", "rmsnorm"),
        "norm_position": ("pre", "post"),
        "head": ("lm", "classify", "reconstruct"),
        "pool": ("mean", "last", "first"),
    }

    def __post_init__(self) -> None:
        for key, allowed in self.CHOICES.items():
            if getattr(self, key) not in allowed:
                raise unknown(f"value of model.{key}", getattr(self, key), allowed)
        for key in ("vocab_size", "d_model", "n_layers", "max_len"):
            if getattr(self, key) < 1:
                raise ZooConfigError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if not self.embed_std > 0:
            raise ZooConfigError(f"model.embed_std must be > 0, got {self.embed_std}")
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
class TaskConfig:
    """A registered task and its arguments (the task's registry defaults fill the rest).

    The task sets the model's vocab_size, head, n_classes and causal flag."""

    name: str = "mqar"
    args: dict[str, Any] = field(default_factory=dict)


LOGGERS = ("csv", "tensorboard")  # train.loggers: the Lightning loggers a run can write, by name


@dataclass
class TrainConfig:
    """How to train: optimiser, schedule, precision, devices, logging."""

    max_steps: int = 500
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    grad_clip: float = 1.0  # 0: off
    precision: str = "32-true"  # any Lightning precision: 32-true, bf16-mixed, 16-mixed, ...
    seed: int = 0  # initialisation (and dropout) seed
    data_seed: Union[int, None] = None  # noqa: UP007  the task's data (None: seed); fixed across init seeds, every run sees the same test set
    stop_at: float = 0.0  # stop once validation accuracy reaches this (Zoology: 0.99); 0: train max_steps
    accelerator: str = "auto"
    devices: Union[int, str] = 1  # noqa: UP007
    strategy: str = "auto"  # ddp, fsdp, ... (Lightning strategies)
    num_nodes: int = 1
    val_every: int = 100  # steps between validations
    early_stop_patience: int = 0  # validations without improvement of val/loss; 0: off
    log_dir: str = "runs"
    run_name: str = ""  # default: <task>-<mixers>-<time>
    overwrite: bool = False  # replace an earlier run of the same name (else refused)
    threads: int = 0  # torch.set_num_threads; 0: leave as is
    # keep: freed memory is reused, as PyTorch's CUDA caching allocator does (the C library's
    # default returns every large block and page-faults it in again; zoo.measure.set_allocator);
    # system: leave the process's allocator alone
    allocator: str = "keep"
    progress: bool = True
    compile: bool = False  # torch.compile the model (in place: checkpoints keep their parameter names)
    # Lightning loggers: csv (metrics.csv) is always written, as the zoo reads it back; add tensorboard
    loggers: list[str] = field(default_factory=lambda: ["csv"])
    # any other Lightning Trainer option, passed through (accumulate_grad_batches, max_time,
    # limit_val_batches, ...); the options above are set through their own keys
    trainer: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for key in ("max_steps", "batch_size", "val_every"):
            if getattr(self, key) < 1:
                raise ZooConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ZooConfigError("train needs lr > 0, warmup_steps >= 0 and 0 <= min_lr_ratio <= 1; got "
                                 f"lr={self.lr}, warmup_steps={self.warmup_steps}, min_lr_ratio={self.min_lr_ratio}")
        for key in ("weight_decay", "grad_clip", "threads", "early_stop_patience"):
            if getattr(self, key) < 0:
                raise ZooConfigError(f"train.{key} must be >= 0 (0: {'off' if key != 'threads' else 'leave as is'}), "
                                     f"got {getattr(self, key)}")
        if not 0.0 <= self.stop_at <= 1.0:
            raise ZooConfigError(f"train.stop_at is a validation accuracy in [0, 1] (0: off), got {self.stop_at}")
        if self.num_nodes < 1:
            raise ZooConfigError(f"train.num_nodes must be >= 1, got {self.num_nodes}")
        if self.allocator not in ("keep", "system"):
            raise unknown("train.allocator", self.allocator, ("keep", "system"))
        for name in self.loggers:
            if name not in LOGGERS:
                raise unknown("logger in train.loggers", name, LOGGERS)


@dataclass
class Config:
    """Everything one run needs: the model, the task, the training."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


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
        options = [o for o in typing.get_args(tp) if o is not type(None)]
        if value is None and len(options) < len(typing.get_args(tp)):
            return None
        if len(options) == 1:  # Optional[X]: X's own error names the bad key
            return _coerce(options[0], value, where)
        for option in options:
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
        _, item = typing.get_args(tp) or (Any, Any)
        return {k: _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
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
    """Read a run config from YAML: sections named as in :class:`Config` (model, task, train)."""
    data = read_yaml(path, "config file") or {}
    return from_dict(Config, data, where=Path(path).name)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply command-line overrides ``--model.mixer window --train.max_steps 100`` to a config
    dict. Values are read as YAML (``[a, b]``, ``3``, ``true``); keys are checked later."""
    data = yaml.safe_load(yaml.safe_dump(data))  # a deep copy
    i = 0
    while i < len(overrides):
        key = overrides[i]
        if not key.startswith("--") or "." not in key:
            raise ZooConfigError(f"override {key!r} must look like --section.key VALUE (e.g. --model.mixer window)")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(overrides):
            raw = overrides[i + 1]
            i += 2
        else:
            raise ZooConfigError(f"override {key!r} has no value")
        *path, last = key[2:].split(".")
        node = data
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ZooConfigError(f"override {key!r}: {part!r} is not a section")
        node[last] = _scalar(yaml.safe_load(raw))
    return data


def _scalar(value: Any) -> Any:
    """YAML 1.1 reads '3e-3' as a string; a command line means the number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value
