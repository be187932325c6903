"""The mixer contract, in code: backends, the base class of sequence mixers, state sizes.

A sequence mixer is ``Mixer(d_model, *, causal, **hyper)`` mapping ``(B, T, d_model)`` to the
same shape. One that decodes offers ``init_state(batch)`` and ``step(x_t, state) -> (y_t,
state)`` with ``x_t`` of shape ``(B, d_model)``.

Backends, one way for every mixer: each implementation is a method marked ``@implements(name,
op=...)`` (``attend_torch`` implements ``attend`` for the ``torch`` backend), the mixer calls
``self.implementation(op, device)`` and runs what it returns, and ``AUTO_ORDER`` is its
preference for ``backend="auto"``. The backend names are stated once, in the registry's
``backends``; the registry checks at load that the class implements exactly those.

Causality is on values: with ``causal=True`` changing inputs after t leaves outputs up to t
bit-identical. A mixer that is causal only in its mask (as published) says why in
``causal_leak`` and ``strictly_causal: false`` in the registry.

Decode states follow one rule: ``step`` never changes what its input state means, so a state
may be stepped twice (beam search, speculative decoding, a retry) and both branches are right.
Mixers that append in place (a KV cache, a ring buffer) do so copy-on-write: a state whose
buffers another branch has already written past is copied first (``claim_buffers``).

Auxiliary losses: a module that has one sets ``self.aux_losses = {"name": scalar}`` during its
forward; the model gathers and sums them by name (see ``zoo.model.Backbone``). No global state,
so it works unchanged under DDP.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch import nn

from zoo.errors import ZooConfigError, at_least, unknown


@dataclass(frozen=True)
class Backend:
    """One implementation of a mixer: the package it needs and the devices it runs on."""

    package: str | None = None  # importable module name, e.g. "xformers"
    extra: str | None = None  # the pip extra that installs it, e.g. "gpu"
    devices: tuple[str, ...] = ("cpu", "cuda", "mps", "xpu")

    def installed(self) -> bool:
        return self.package is None or importlib.util.find_spec(self.package) is not None

    def runs_on(self, device_type: str) -> bool:
        return self.installed() and device_type in self.devices

    def missing(self) -> str:
        extra = f" (pip install 'zoo[{self.extra}]')" if self.extra else ""
        return f"needs the package {self.package!r}{extra}"


ALL_DEVICES = ("cpu", "cuda", "mps", "xpu")


def implements(*backends: str, op: str, package: str | None = None, extra: str | None = None,
               devices: tuple[str, ...] = ALL_DEVICES):
    """Marks a method of a :class:`SequenceMixer` as its operation ``op`` on each of ``backends``;
    ``package``, ``extra`` and ``devices`` say what that backend needs (see :class:`Backend`)."""
    spec = Backend(package, extra, tuple(devices))

    def mark(fn):
        fn.zoo_implements = (op, backends, spec)
        return fn

    return mark


class SequenceMixer(nn.Module):
    """Base class for the zoo's own sequence mixers: the causal flag and backend choice.

    User mixers need not subclass it; the registry and the contract tests only rely on the
    constructor signature and the shape contract.
    """

    AUTO_ORDER: tuple[str, ...] = ("reference",)
    _methods: dict[tuple[str, str], str] = {}  # (op, backend) -> method name, from @implements
    _backends: dict[str, Backend] = {"reference": Backend()}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        methods, specs = {}, {}
        for klass in reversed(cls.__mro__):
            for name, fn in vars(klass).items():
                op, backends, spec = getattr(fn, "zoo_implements", (None, (), None))
                for b in backends:
                    if specs.setdefault(b, spec) != spec:
                        raise TypeError(f"{cls.__name__}: backend {b!r} declared with two different requirements")
                    methods[op, b] = name
        for op in {op for op, _ in methods}:
            missing = [b for b in specs if (op, b) not in methods]
            if missing:
                raise TypeError(f"{cls.__name__}: {op} has no implementation for backend(s) {missing} "
                                f"(mark one with @implements(..., op={op!r}))")
        if methods:
            unknown_auto = [b for b in cls.AUTO_ORDER if b not in specs]
            if unknown_auto:
                raise TypeError(f"{cls.__name__}.AUTO_ORDER names {unknown_auto}, which it does not implement")
            cls._methods, cls._backends = methods, specs

    @classmethod
    def backends(cls) -> dict[str, Backend]:
        """The backends this class implements (name -> what it needs)."""
        return dict(cls._backends)

    def __init__(self, d_model: int, *, causal: bool, backend: str = "auto"):
        super().__init__()
        at_least(type(self).__name__, 1, d_model=d_model)
        specs = self.backends()
        if backend != "auto" and backend not in specs:
            raise unknown(f"backend of {type(self).__name__}", backend, [*specs, "auto"])
        if backend != "auto" and not specs[backend].installed():
            raise ZooConfigError(f"backend {backend!r} of {type(self).__name__} {specs[backend].missing()}")
        self.d_model = d_model
        self.causal = bool(causal)
        self.backend = backend
        self._auto: dict[str, str] = {}

    def backend_for(self, device: torch.device) -> str:
        """The backend that runs on ``device``: the requested one, or auto's first available."""
        dev, specs = device.type, self._backends
        if self.backend != "auto":
            spec = specs[self.backend]
            if dev not in spec.devices:
                raise ZooConfigError(
                    f"backend {self.backend!r} of {type(self).__name__} runs on "
                    f"{', '.join(spec.devices)}, not on {dev}; use backend='auto' or one of "
                    f"{', '.join(n for n, b in specs.items() if b.runs_on(dev))}"
                )
            return self.backend
        if dev not in self._auto:
            self._auto[dev] = next(
                (n for n in self.AUTO_ORDER if specs[n].runs_on(dev)), "reference"
            )
        return self._auto[dev]

    def implementation(self, op: str, device: torch.device):
        """The bound method that runs ``op`` with the backend chosen for ``device``."""
        return getattr(self, self._methods[op, self.backend_for(device)])

    @property
    def causal_leak(self) -> str | None:
        """Why this causal mixer's outputs still depend on later inputs' values, or None when
        they do not (the contract's default). A model refuses a leaky mixer for a causal task
        unless its config sets ``allow_causal_leak: true``."""
        return None

    def flops(self, batch: int, length: int) -> int | None:
        """Forward FLOPs of the ``torch`` backend's algorithm on (batch, length, d_model), 2 per
        multiply-add (FlopCounterMode's convention), or None: not counted. A formula, not a
        measurement, so it holds for every backend and device (a fused kernel does the same
        products). Subclasses that have one override it (tests check each against FlopCounterMode
        on the CPU, where it sees every product); a mixer without one shows "not counted"."""
        return None

    def full_at(self, length: int) -> bool:
        """True when, at sequences of ``length``, this mixer's restriction (a window, a bucket)
        covers the whole sequence, so that it computes full attention: a comparison that means
        to test the restriction is then void (suites refuse it, ``zoo fit`` warns)."""
        return False

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, causal={self.causal}, backend={self.backend!r}"


def claim_buffers(state: dict, names: tuple[str, ...]) -> dict:
    """Copy-on-write for decode states that append into preallocated buffers in place.

    ``state["length"]`` is the number of positions the state holds; ``state["written"]`` is a
    one-element list shared by every state that shares the buffers, holding how far they have
    been written. Writing at ``length`` in place is safe when nobody wrote past it (the linear
    decode path, O(1)); otherwise another branch owns the slots from ``length`` on, so the
    buffers are copied first (once per fork, O(buffer)). Returns the state to write into, with
    ``written`` already advanced to ``length + 1``."""
    n = state["length"]
    if state["written"][0] != n:
        state = {**state, **{k: state[k].clone() for k in names}, "written": [n]}
    state["written"][0] = n + 1
    return state


def decode(mixer: nn.Module, x: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
    """Step ``mixer`` through ``x`` (B, T, d) one position at a time, from ``state`` (a fresh
    ``init_state`` when None): returns the outputs (B, T, d) and the state after the last step.
    The contract: this equals ``mixer(x)`` (for a fresh state), and ``state`` itself stays valid,
    so decoding from it again, or from any earlier state, gives the same result."""
    if state is None:
        state = mixer.init_state(x.shape[0], device=x.device, dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        y, state = mixer.step(x[:, t], state)
        ys.append(y)
    return (torch.stack(ys, 1) if ys else x.new_zeros(x.shape)), state


def state_nbytes(state: object) -> int:
    """Bytes held by a decode state: every tensor in it, nested in dicts, lists or tuples."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_nbytes(v) for v in state)
    return 0
