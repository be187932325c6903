"""The registry: every name a user can type, read from the top-level ``registry.yaml`` plus overlays.

Overlays are the user's own YAML files of the same shape, named by ``Registry.load(path)``,
by ``zoo --registry PATH``, or by the environment variable ``ZOO_REGISTRY`` (several paths
joined by ``os.pathsep``). A name already registered may only be redefined by an entry that
says ``replace: true``. Every entry is validated when loaded: its class imports, is an
``nn.Module``, and accepts its defaults; its capabilities use known words.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from zoo.contract import SequenceMixer
from zoo.errors import ZooConfigError, read_yaml, unknown
from zoo.nn.positions import IN_ATTENTION, SCHEMES


def package_file() -> Path:
    """The built-in registry: ``registry.yaml`` at the top of a source checkout (an editable install
    reads it, so editing it changes ``zoo list`` at once), else the copy a wheel ships inside the
    package (``setup.py`` puts it there)."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "registry.yaml").is_file():
        return checkout / "registry.yaml"
    return Path(__file__).with_name("registry.yaml")

ENV_VAR = "ZOO_REGISTRY"

SEQUENCE, CHANNEL, POSITION_SCHEMES, TASKS = "sequence_mixers", "channel_mixers", "positions", "tasks"
KINDS = (SEQUENCE, CHANNEL, POSITION_SCHEMES, TASKS)
_KIND_WORD = {SEQUENCE: "sequence mixer", CHANNEL: "channel mixer", POSITION_SCHEMES: "positional scheme",
              TASKS: "task"}

_COMMON = {"description", "paper", "notes", "replace"}
_KEYS = {
    SEQUENCE: _COMMON
    | {"class", "defaults", "tiny", "causal", "strictly_causal", "bidirectional", "decode", "positions",
       "default_position", "backends", "complexity"},
    CHANNEL: _COMMON | {"class", "defaults", "tiny", "backends", "complexity"},
    POSITION_SCHEMES: _COMMON | {"where"},
    TASKS: _COMMON | {"class", "defaults", "tiny", "metric"},
}
_REQUIRED = {SEQUENCE: {"class", "description"}, CHANNEL: {"class", "description"},
             POSITION_SCHEMES: {"description", "where"}, TASKS: {"class", "description"}}


@dataclass(frozen=True)
class Entry:
    """One registered name and what it can do."""

    kind: str
    name: str
    source: str  # the file that defined it
    description: str
    paper: str = ""
    notes: str = ""
    class_path: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    tiny: dict[str, Any] = field(default_factory=dict)
    causal: bool = True
    # causal mode masks the future AND no output depends on a later input's value. False for a
    # method that is causal only in its mask as published (LSH: later tokens move the chunks).
    strictly_causal: bool = True
    bidirectional: bool = True
    decode: bool = False
    positions: tuple[str, ...] = ("none", "sinusoidal", "learned")
    default_position: str = "none"  # what `position: auto` takes for this mixer
    backends: tuple[str, ...] = ("reference",)
    complexity: dict[str, str] = field(default_factory=dict)
    where: str = ""
    metric: str = ""

    @property
    def cls(self) -> type:
        return _import(self.class_path, self)

    @property
    def label(self) -> str:
        return f"{_KIND_WORD[self.kind]} {self.name!r}"

    def available_backends(self, device_type: str) -> dict[str, str]:
        """backend -> '' when it runs on ``device_type``, else the reason it does not."""
        specs = self.cls.backends() if issubclass(self.cls, SequenceMixer) else {}
        out = {}
        for b in self.backends:
            spec = specs.get(b)
            if spec is None or spec.runs_on(device_type):
                out[b] = ""
            elif not spec.installed():
                out[b] = spec.missing()
            else:
                out[b] = f"runs on {', '.join(spec.devices)} only"
        return out


def _import(path: str, entry: Entry) -> type:
    module, _, attr = path.rpartition(".")
    where = f"{entry.label} (from {entry.source})"
    if not module:
        raise ZooConfigError(f"{where}: class {path!r} must be a full import path 'pkg.module.Class'")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ZooConfigError(f"{where}: cannot import module {module!r} of class {path!r}: {e}") from e
    except AttributeError as e:
        raise ZooConfigError(f"{where}: module {module!r} has no class {attr!r}") from e


def accepted_kwargs(cls: type) -> tuple[set[str], bool]:
    """The keyword names ``cls`` accepts and whether it takes any keyword at all.

    A constructor that forwards ``**kwargs`` to its base class accepts the base's names too: the
    classes of the MRO are read until one takes no ``**kwargs``."""
    names: set[str] = set()
    for klass in cls.__mro__ if isinstance(cls, type) else (cls,):
        init = klass.__init__ if isinstance(klass, type) else klass
        if init is object.__init__:
            return names - {"d_model", "self"}, True
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names - {"d_model", "self"}, False
    return names - {"d_model", "self"}, True


def hyper_defaults(cls: type, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every keyword ``cls`` takes with its default (its bases' too, through ``**kwargs``), then
    ``overrides`` (a registry entry's ``defaults``): what a user gets without setting anything."""
    names, _ = accepted_kwargs(cls)
    found: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):  # the most derived default wins
        if klass is not object and "__init__" in vars(klass):
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.name in names and p.default is not inspect.Parameter.empty:
                    found[p.name] = p.default
    return {**{k: found[k] for k in sorted(found)}, **(overrides or {})}


def check_kwargs(cls: type, kwargs: dict[str, Any], what: str) -> None:
    """Reject keywords ``cls`` does not take and values of the wrong plain type."""
    names, var = accepted_kwargs(cls)
    bad = [k for k in kwargs if k not in names]
    if bad and not var:
        raise ZooConfigError(f"{what}: {unknown('hyper-parameter', bad[0], names)}")
    sig = {}
    for klass in reversed(cls.__mro__):  # the most derived default wins
        if klass is not object and "__init__" in vars(klass):
            sig.update(inspect.signature(klass.__init__).parameters)
    for k, v in kwargs.items():
        default = sig[k].default if k in sig else inspect.Parameter.empty
        want = type(default)
        if default is inspect.Parameter.empty or default is None or want not in (bool, int, float, str):
            continue
        ok = isinstance(v, want) and not (want is int and isinstance(v, bool))
        ok = ok or (want is float and isinstance(v, int) and not isinstance(v, bool))
        if not ok:
            raise ZooConfigError(
                f"{what}: hyper-parameter {k!r} must be {want.__name__} (like its default "
                f"{default!r}), got {v!r} ({type(v).__name__})"
            )


class Registry:
    """All entries by kind. Build one with :meth:`load`; most code uses :func:`default_registry`."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self.sources: list[str] = []

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, *overlays: str | os.PathLike, env: bool = True) -> Registry:
        """The package registry, then the ``ZOO_REGISTRY`` files (if ``env``), then ``overlays``."""
        reg = cls()
        paths: list[str | os.PathLike] = [package_file()]
        if env and os.environ.get(ENV_VAR):
            paths += [p for p in os.environ[ENV_VAR].split(os.pathsep) if p]
        for p in [*paths, *overlays]:
            reg.add_file(p)
        return reg

    def add_file(self, path: str | os.PathLike) -> None:
        """Entries from a YAML file. Its classes are imported with the file's own folder on the
        import path, so an overlay finds the modules written beside it from any directory."""
        data = read_yaml(path, "registry file")
        folder = str(Path(path).resolve().parent)
        if path != package_file() and folder not in sys.path:
            sys.path.append(folder)
        self.add(data or {}, source=str(path))

    def add(self, data: dict, source: str = "<dict>") -> None:
        """Add the entries of one parsed registry document, validating each."""
        if not isinstance(data, dict):
            raise ZooConfigError(f"registry {source}: the top level must be a mapping of {KINDS}")
        for kind, entries in data.items():
            if kind not in KINDS:
                raise unknown("registry section", kind, KINDS, source)
            if not isinstance(entries, dict):
                raise ZooConfigError(f"registry {source}: section {kind!r} must map names to entries")
            for name, raw in entries.items():
                self._add_entry(kind, str(name), raw, source)
        self.sources.append(source)

    def _add_entry(self, kind: str, name: str, raw: Any, source: str) -> None:
        where = f"{_KIND_WORD[kind]} {name!r} in {source}"
        if not isinstance(raw, dict):
            raise ZooConfigError(f"{where}: an entry must be a mapping, got {raw!r}")
        for key in raw:
            if key not in _KEYS[kind]:
                raise unknown("key", key, _KEYS[kind], where)
        missing = _REQUIRED[kind] - raw.keys()
        if missing:
            raise ZooConfigError(f"{where}: missing required key(s) {sorted(missing)}")
        clash = next((k for k in (SEQUENCE, CHANNEL) if name in self._entries[k]), None)
        if kind in (POSITION_SCHEMES, TASKS):
            clash = kind if name in self._entries[kind] else None
        if clash and not raw.get("replace"):
            old = self._entries[clash][name]
            raise ZooConfigError(
                f"{where}: the name is already registered as a {_KIND_WORD[clash]} "
                f"(from {old.source}); set 'replace: true' to redefine it"
            )
        if clash:
            del self._entries[clash][name]
        fields = {k: v for k, v in raw.items() if k not in ("class", "replace")}
        for key in ("positions", "backends"):
            if key in fields:
                if not isinstance(fields[key], list):
                    raise ZooConfigError(f"{where}: {key!r} must be a list, got {fields[key]!r}")
                fields[key] = tuple(fields[key])
        if kind == SEQUENCE and "default_position" not in fields:
            positions = fields.get("positions", Entry.positions)
            fields["default_position"] = "none" if "none" in positions else positions[0]
        for key in ("causal", "strictly_causal", "bidirectional", "decode"):
            if key in fields and not isinstance(fields[key], bool):
                raise ZooConfigError(f"{where}: {key!r} must be true or false, got {fields[key]!r}")
        for key in ("defaults", "tiny", "complexity"):
            if key in fields and not isinstance(fields[key] or {}, dict):
                raise ZooConfigError(f"{where}: {key!r} must be a mapping, got {fields[key]!r}")
            if key in fields:
                fields[key] = dict(fields[key] or {})
        entry = Entry(kind=kind, name=name, source=source, class_path=raw.get("class", ""), **fields)
        if kind == POSITION_SCHEMES:
            if name not in SCHEMES:
                raise unknown("positional scheme (schemes are built into the model)", name, SCHEMES, source)
        elif kind == TASKS:
            pass  # validated when first built: importing Lightning costs seconds that mixer-only runs skip
        else:
            self._validate_mixer(entry, where)
        self._entries[kind][name] = entry

    def _validate_mixer(self, e: Entry, where: str) -> None:
        cls = e.cls
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ZooConfigError(f"{where}: {e.class_path!r} is not an nn.Module class")
        names, var = accepted_kwargs(cls)
        if e.kind == SEQUENCE:
            if "causal" not in names and not var:
                raise ZooConfigError(
                    f"{where}: {e.class_path} must take the keyword 'causal' "
                    "(the contract is Mixer(d_model, *, causal, **hyper))"
                )
            if not (e.causal or e.bidirectional):
                raise ZooConfigError(f"{where}: causal and bidirectional cannot both be false")
            for p in e.positions:
                if p not in SCHEMES:
                    raise unknown("positional scheme", p, SCHEMES, where)
            if e.default_position not in e.positions:
                raise ZooConfigError(f"{where}: default_position {e.default_position!r} is not among its positions "
                                     f"{list(e.positions)}")
            if set(e.positions) & set(IN_ATTENTION) and "position" not in names and not var:
                raise ZooConfigError(
                    f"{where}: lists {sorted(set(e.positions) & set(IN_ATTENTION))} in positions "
                    f"but {e.class_path} takes no 'position' keyword"
                )
        honoured = getattr(cls, "IN_ATTENTION", None)  # the in-attention schemes its code applies
        listed = tuple(p for p in e.positions if p in IN_ATTENTION)
        if e.kind == SEQUENCE and honoured is not None and set(honoured) != set(listed):
            raise ZooConfigError(
                f"{where}: positions list the in-attention schemes {list(listed)} but {e.class_path} "
                f"applies {list(honoured)} (its IN_ATTENTION)"
            )
        implemented = cls.backends() if issubclass(cls, SequenceMixer) else None
        if implemented is not None and set(implemented) != set(e.backends):
            raise ZooConfigError(
                f"{where}: backends {list(e.backends)} differ from the backends {e.class_path} implements "
                f"{list(implemented)} (its @implements methods)"
            )
        for key in ("defaults", "tiny"):
            check_kwargs(cls, getattr(e, key), f"{where} ({key})")

    def _validate_task(self, e: Entry, where: str) -> None:
        from zoo.tasks.base import Task

        cls = e.cls
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise ZooConfigError(f"{where}: {e.class_path!r} is not a zoo.tasks.base.Task (a LightningDataModule)")
        for key in ("defaults", "tiny"):
            check_kwargs(cls, getattr(e, key), f"{where} ({key})")

    def build_task(self, name: str, **overrides: Any):
        """A task (LightningDataModule) by name: its defaults, then ``overrides``."""
        e = self.get(TASKS, name)
        self._validate_task(e, f"{e.label} (from {e.source})")
        kwargs = {**e.defaults, **overrides}
        check_kwargs(e.cls, kwargs, e.label)
        try:
            return e.cls(**kwargs)
        except ZooConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ZooConfigError(f"building {e.label} with {kwargs} failed: {err}") from err

    # -- lookup --------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return list(self._entries[kind])

    def entries(self, kind: str) -> list[Entry]:
        return list(self._entries[kind].values())

    def get(self, kind: str, name: str) -> Entry:
        if kind not in self._entries:
            raise unknown("registry kind", kind, KINDS)
        if name not in self._entries[kind]:
            raise unknown(_KIND_WORD[kind], name, self._entries[kind])
        return self._entries[kind][name]

    def mixer(self, name: str) -> Entry:
        """A sequence or channel mixer by name (names are unique across both)."""
        for kind in (SEQUENCE, CHANNEL):
            if name in self._entries[kind]:
                return self._entries[kind][name]
        raise unknown("mixer", name, [*self._entries[SEQUENCE], *self._entries[CHANNEL]])

    # -- building ------------------------------------------------------------------------
    def check_position(self, e: Entry, position: str) -> None:
        if position not in SCHEMES:
            raise unknown("positional scheme", position, SCHEMES)
        if position not in e.positions:
            raise ZooConfigError(
                f"{e.label} cannot use position {position!r}; it accepts: {', '.join(e.positions)}"
            )

    def check_causal(self, e: Entry, causal: bool) -> None:
        if causal and not e.causal:
            why = f" {e.notes}" if e.notes else ""
            raise ZooConfigError(f"{e.label} cannot be causal.{why}")
        if not causal and not e.bidirectional:
            raise ZooConfigError(f"{e.label} is causal only; it cannot be used bidirectionally")

    def build_mixer(self, name: str, d_model: int, **overrides: Any) -> nn.Module:
        """Build a registered mixer: its defaults, then ``overrides``.

        Sequence mixers take ``causal`` (default: causal when the mixer can be) and
        ``position`` (default ``none``); both are checked against the entry's capabilities.
        """
        e = self.mixer(name)
        kwargs = {**e.defaults, **overrides}
        cls = e.cls
        if e.kind == CHANNEL:
            if "causal" in kwargs or "position" in kwargs:
                bad = "causal" if "causal" in kwargs else "position"
                raise ZooConfigError(f"{e.label} takes no {bad!r}: channel mixers act per token")
        else:
            kwargs["causal"] = bool(kwargs.get("causal", e.causal))
            self.check_causal(e, kwargs["causal"])
            position = kwargs.pop("position", "none")
            self.check_position(e, position)
            names, var = accepted_kwargs(cls)
            if "position" in names or var:
                kwargs["position"] = position
        if "backend" in kwargs and kwargs["backend"] != "auto" and kwargs["backend"] not in e.backends:
            raise unknown(f"backend of {e.label}", kwargs["backend"], [*e.backends, "auto"])
        check_kwargs(cls, kwargs, e.label)
        try:
            return cls(d_model, **kwargs)
        except ZooConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ZooConfigError(f"building {e.label} with {kwargs} failed: {err}") from err


@functools.lru_cache(maxsize=8)
def _cached(env_value: str) -> Registry:
    return Registry.load()


def default_registry() -> Registry:
    """The package registry plus the ``ZOO_REGISTRY`` overlays (re-read when that changes)."""
    return _cached(os.environ.get(ENV_VAR, ""))


def build_mixer(name: str, d_model: int, **overrides: Any) -> nn.Module:
    """Build any sequence or channel mixer of the default registry by name."""
    return default_registry().build_mixer(name, d_model, **overrides)
