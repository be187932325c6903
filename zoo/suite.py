"""Benchmark suites: typed specs read from YAML, expanded into cases.

A suite names what to measure; ``zoo/suites/*.yaml`` are the built-in ones (``zoo bench NAME``),
and any YAML file of the same shape works (``zoo bench path/to/suite.yaml``). Unknown fields are
errors that name the field. A case is one measurement, run in its own process by ``zoo.sweep``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from zoo.config import apply_overrides, from_dict
from zoo.errors import ZooConfigError, read_yaml
from zoo.registry import CHANNEL, SEQUENCE, default_registry

SUITES_DIR = Path(__file__).with_name("suites")
MODES = ("forward", "forward_backward")


@dataclass
class SpeedSpec:
    mixers: Union[str, list[str]] = "all"  # noqa: UP007  "all": every sequence and channel mixer
    lengths: list[int] = field(default_factory=lambda: [256, 1024])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    d_model: int = 256
    batch: int = 1
    dtype: str = "float32"
    args: dict[str, Any] = field(default_factory=dict)  # mixer_args: shared keys and per-mixer dicts


@dataclass
class DecodeSpec:
    mixers: Union[str, list[str]] = "all"  # noqa: UP007  "all": every mixer that decodes
    contexts: list[int] = field(default_factory=lambda: [256, 1024])
    d_model: int = 256
    batch: int = 1
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class QualitySpec:
    mixers: Union[str, list[str]] = "all"  # noqa: UP007  "all": every sequence mixer the task allows
    tasks: dict[str, dict[str, Any]] = field(default_factory=lambda: {"mqar": {}})  # name -> task args
    model: dict[str, Any] = field(default_factory=dict)  # model config keys, shared by every mixer
    train: dict[str, Any] = field(default_factory=dict)  # train config keys (the budget)


@dataclass
class ExtrapolationSpec:
    mixer: str = "softmax"
    positions: list[str] = field(default_factory=lambda: ["none", "sinusoidal", "learned", "rope", "alibi"])
    task: str = "induction"
    args: dict[str, Any] = field(default_factory=dict)  # task args; test at 1x, 2x, 4x seq_len
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


@dataclass
class FindingsSetting:
    """One task setting of a findings suite; ``model`` and ``train`` override the suite's."""

    task: str = "mqar"
    args: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    mixers: Union[list[str], None] = None  # noqa: UP007  None: the suite's
    group: str = ""  # what the report's score per task counts it under; "": its task's name


@dataclass
class FindingsSpec:
    """The findings protocol (zoo.findings): per mixer x setting, an lr grid on the first seed,
    then the chosen lr over the other seeds; claims evaluated on the aggregates."""

    mixers: list[str] = field(default_factory=lambda: ["softmax", "linear", "mamba"])
    settings: dict[str, FindingsSetting] = field(default_factory=dict)
    lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3])
    # rates beyond the grid, nearest first on each side: each is tried only where the rates tried
    # so far chose their own edge on its side without reaching train.stop_at (a rate chosen at
    # the grid's edge is not tuned); otherwise its row reads "skipped" and costs nothing
    extend_lrs: list[float] = field(default_factory=list)
    # a longer budget (train.max_steps) for a run of the chosen rate that ends its budget still
    # improving: it is run again with this many steps and counts in its place; 0: none. Where
    # no run needs it, its rows read "skipped" and cost nothing
    extend_steps: int = 0
    # the tuning's runner-up rate on a seed that stalled at the chosen rate beside a seed that
    # learned (SEEDS SPLIT): it tells a split that comes from the rate (it learns there) from one
    # that comes from the init (it stalls there too). Where the seeds did not split its rows read
    # "skipped" and cost nothing
    runner_up: bool = False
    # a weight-decay grid crossed with lrs (MAD's {0, 0.1}); the best (lr, weight decay) by
    # validation is the choice. Empty: no grid, train.weight_decay as given
    weight_decays: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data_seed: int = 0  # fixed: every run sees the same validation and test sets
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    claims: str = ""  # a claims file: a path, or a name of zoo/suites/ (e.g. claims.yaml)
    # the report adds each mixer's mean over a task's settings (MAD's score per task)
    score_by_task: bool = False


@dataclass
class Suite:
    name: str = "suite"
    description: str = ""
    threads: int = 0  # torch threads per case; 0: all cores
    timeout: int = 600  # seconds per case
    # keep: freed memory is reused, as a caching allocator does (zoo.measure.set_allocator); system:
    # the C library's defaults. Timing cases carry it in their settings; training cases record it
    # in their row's env only (it changes their speed, not what they compute)
    allocator: str = "keep"
    speed: Union[SpeedSpec, None] = None  # noqa: UP007
    decode: Union[DecodeSpec, None] = None  # noqa: UP007
    quality: Union[QualitySpec, None] = None  # noqa: UP007
    extrapolation: Union[ExtrapolationSpec, None] = None  # noqa: UP007
    findings: Union[FindingsSpec, None] = None  # noqa: UP007
    quick: dict[str, Any] = field(default_factory=dict)  # overrides applied by --quick

    def __post_init__(self) -> None:
        where = f"suite {self.name!r}"
        if not any((self.speed, self.decode, self.quality, self.extrapolation, self.findings)):
            raise ZooConfigError(f"{where} has nothing to run: give at least one of speed, decode, quality, "
                                 "extrapolation, findings")
        if self.timeout < 1 or self.threads < 0:
            raise ZooConfigError(f"{where}: timeout must be >= 1 second and threads >= 0 (0: the machine's); "
                                 f"got timeout={self.timeout}, threads={self.threads}")
        if self.allocator not in ("keep", "system"):
            raise ZooConfigError(f"{where}: allocator must be keep or system, got {self.allocator!r}")
        for name, spec in (("speed", self.speed), ("decode", self.decode)):
            if spec and (spec.batch < 1 or spec.d_model < 1):
                raise ZooConfigError(f"{where}: {name}.batch and {name}.d_model must be >= 1; "
                                     f"got batch={spec.batch}, d_model={spec.d_model}")
        # the model and train sections are checked now, not when each case runs minutes later
        from zoo.config import ModelConfig, TrainConfig

        sections = [("quality", self.quality), ("extrapolation", self.extrapolation), ("findings", self.findings)]
        settings = self.findings.settings.items() if self.findings else ()
        sections += [(f"findings.settings.{k}", st) for k, st in settings]
        for name, spec in sections:
            if spec is None:
                continue
            from_dict(ModelConfig, {"vocab_size": 2, **spec.model}, where=f"{where}: {name}.model")
            train = {k: v for k, v in spec.train.items() if k not in ("lr", "seed", "data_seed")}
            from_dict(TrainConfig, train, where=f"{where}: {name}.train")
        if self.extrapolation:
            from zoo.errors import unknown
            from zoo.nn.positions import SCHEMES

            for p in self.extrapolation.positions:
                if p not in SCHEMES:
                    raise unknown("positional scheme in extrapolation.positions", p, SCHEMES, where)
        if self.speed:
            for m in self.speed.modes:
                if m not in MODES:
                    raise ZooConfigError(f"suite {self.name!r}: speed.modes has {m!r}; allowed: {', '.join(MODES)}")
            if self.speed.dtype not in ("float32", "float64", "bfloat16", "float16"):
                raise ZooConfigError(f"suite {self.name!r}: speed.dtype {self.speed.dtype!r}; allowed: float32, "
                                     "float64, bfloat16, float16")
        f = self.findings
        if f:
            if not f.settings or not f.lrs or not f.seeds:
                raise ZooConfigError(f"suite {self.name!r}: findings needs settings, lrs and seeds (non-empty)")
            if any(lr <= 0 for lr in f.lrs) or len(set(f.seeds)) != len(f.seeds):
                raise ZooConfigError(f"suite {self.name!r}: findings.lrs must be > 0 and findings.seeds distinct; "
                                     f"got lrs={f.lrs}, seeds={f.seeds}")
            inside = [x for x in f.extend_lrs if x <= 0 or min(f.lrs) <= x <= max(f.lrs)]
            if inside or len(set(f.extend_lrs)) != len(f.extend_lrs):
                raise ZooConfigError(f"suite {self.name!r}: findings.extend_lrs must be distinct rates > 0 outside the "
                                     f"grid [{min(f.lrs):g}, {max(f.lrs):g}] (they extend it); got {f.extend_lrs}")
            budgets = [_merge(f.train, st.train).get("max_steps", TrainConfig.max_steps) for st in f.settings.values()]
            if f.extend_steps and f.extend_steps <= max(budgets):
                raise ZooConfigError(f"suite {self.name!r}: findings.extend_steps ({f.extend_steps}) must exceed every "
                                     f"setting's train.max_steps (up to {max(budgets)}): it is the longer budget for "
                                     "runs still improving at theirs; 0 turns it off")
            if any(w < 0 for w in f.weight_decays) or len(set(f.weight_decays)) != len(f.weight_decays):
                raise ZooConfigError(f"suite {self.name!r}: findings.weight_decays must be distinct and >= 0; got "
                                     f"{f.weight_decays}")
            owned = ("lr", "seed", "data_seed") + (("weight_decay",) if f.weight_decays else ())
            for key in owned:
                if key in f.train or any(key in st.train for st in f.settings.values()):
                    raise ZooConfigError(f"suite {self.name!r}: findings sets train.{key} itself (findings.lrs, "
                                         "findings.seeds, findings.data_seed, findings.weight_decays); remove it "
                                         "from findings.train")
        for spec, key in ((self.speed, "lengths"), (self.decode, "contexts")):
            if spec and (not getattr(spec, key) or min(getattr(spec, key)) < 1):
                raise ZooConfigError(f"suite {self.name!r}: {key} must be a non-empty list of positive lengths")


def builtin_suites() -> list[str]:
    """The names of the built-in suites (zoo/suites/*.yaml; the claims files beside them are not
    suites)."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml") if not p.stem.startswith("claims"))


def load_suite(name_or_path: str, quick: bool = False) -> Suite:
    """A built-in suite by name or a suite file by path; ``quick`` applies its ``quick`` overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SUITES_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            builtin = builtin_suites()
            from zoo.errors import unknown
            raise unknown("suite", name_or_path, builtin)
    data = read_yaml(path, "suite file") or {}
    if not isinstance(data, dict):
        raise ZooConfigError(f"suite file {str(path)!r} must be a mapping")
    data.setdefault("name", path.stem)
    if quick and data.get("quick"):
        args = []
        for key, value in data["quick"].items():
            args += [f"--{key}", yaml.safe_dump(value, default_flow_style=True).strip()]
        data = apply_overrides(data, args)
    return from_dict(Suite, data, where=f"suite {path.name}")


# -- cases -----------------------------------------------------------------------------------
def _mixers(spec_mixers, kind_filter) -> list[str]:
    reg = default_registry()
    if spec_mixers == "all":
        return [e.name for e in reg.entries(SEQUENCE) + reg.entries(CHANNEL) if kind_filter(e)]
    names = [spec_mixers] if isinstance(spec_mixers, str) else list(spec_mixers)
    for n in names:
        reg.mixer(n)  # unknown names fail here, with suggestions
    return names


def cases(suite: Suite) -> list[dict]:
    """Every case of the suite, in a fixed order; each has a unique ``key``."""
    out: list[dict] = []
    s = suite.speed
    if s:
        for mixer in _mixers(s.mixers, lambda e: True):
            for T in s.lengths:
                for mode in s.modes:
                    out.append({"kind": "speed", "mixer": mixer, "mixer_kind": default_registry().mixer(mixer).kind,
                                "length": T, "mode": mode, "d_model": s.d_model,
                                "batch": s.batch, "dtype": s.dtype, "args": s.args,
                                "key": f"speed/{mixer}/{mode}/T={T}"})
    d = suite.decode
    if d:
        for mixer in _mixers(d.mixers, lambda e: e.kind == SEQUENCE and e.decode):
            for T in d.contexts:
                out.append({"kind": "decode", "mixer": mixer, "context": T, "d_model": d.d_model, "batch": d.batch,
                            "args": d.args, "key": f"decode/{mixer}/T={T}"})
    q = suite.quality
    if q:
        reg = default_registry()
        for task, args in q.tasks.items():
            causal = reg.build_task(task, **(args or {})).causal
            leak_ok = bool((q.model or {}).get("allow_causal_leak", False))

            def fits(e, causal=causal, leak_ok=leak_ok):
                # "all" on a causal task: the mixers that are causal on values (lsh, causal in
                # its mask only, joins when the suite's model sets allow_causal_leak)
                ok = (e.causal and (e.strictly_causal or leak_ok)) if causal else e.bidirectional
                return e.kind == SEQUENCE and ok

            for mixer in _mixers(q.mixers, fits):
                out.append({"kind": "quality", "mixer": mixer, "task": task, "task_args": args or {},
                            "model": q.model, "train": q.train, "key": f"quality/{task}/{mixer}"})
    x = suite.extrapolation
    if x:
        for pos in x.positions:
            out.append({"kind": "extrapolation", "mixer": x.mixer, "position": pos, "task": x.task,
                        "task_args": x.args, "model": x.model, "train": x.train,
                        "key": f"extrapolation/{x.task}/{x.mixer}/{pos}"})
    f = suite.findings
    if f:
        out += _findings_cases(f)
    for spec, what in ((s, "speed"), (d, "decode")):  # each case keeps only its own mixer's arguments
        mine = [c for c in out if c["kind"] == what]
        if mine:
            from zoo.model import mixer_kwargs

            split = mixer_kwargs(default_registry(), [c["mixer"] for c in mine], spec.args,
                                 f"suite {suite.name!r}: {what}.args")
            for c in mine:
                c["args"] = split[c["mixer"]]
    checked = set()  # one check per model and task: a findings grid repeats them for every rate
    for c in out:  # a training case's model settings fail here, before any case runs
        if c["kind"] in ("quality", "extrapolation", "findings"):
            what = json.dumps([c["mixer"], c["model"], c["task"], c["task_args"]], sort_keys=True, default=str)
            if what not in checked:
                _check_model(suite.name, c)
                checked.add(what)
        c["threads"] = suite.threads
        if c["kind"] in ("speed", "decode") or suite.allocator != "keep":
            c["allocator"] = suite.allocator
    return copy.deepcopy(out)


def _findings_cases(f: FindingsSpec) -> list[dict]:
    """Tune cases (every lr, first seed) first, then extension cases (a rate of extend_lrs, run
    only where the choice sits at that edge: decided when the case starts, see zoo.sweep), then
    seed cases (lr 'best': chosen from the tune and extension rows when the case starts), then
    longer-budget cases (one per seed, lr 'best', max_steps extend_steps: run only where that
    seed's run of the chosen rate ended still improving), then with ``runner_up`` runner-up
    cases (one per seed after the first, lr 'runnerup': the tuning's second rate, run only where
    that seed stalled at the chosen rate beside a seed that learned; the first seed's run there
    is its tune run)."""
    reg = default_registry()
    up = sorted(x for x in f.extend_lrs if x > max(f.lrs))
    down = sorted((x for x in f.extend_lrs if x < min(f.lrs)), reverse=True)
    # nearest first on each side; "extend" k waits for the tune cases and extensions k' < k
    beyond = sorted([(k + 1, x) for k, x in enumerate(up)] + [(k + 1, x) for k, x in enumerate(down)])
    tune, seeds, longer, second = [], [], [], []
    wds = [{"weight_decay": w} for w in f.weight_decays] or [{}]  # {}: no grid, train.weight_decay as given
    for name, st in f.settings.items():
        task = reg.build_task(st.task, **st.args)
        model = _merge(f.model, st.model)
        for mixer in st.mixers or f.mixers:
            e = reg.mixer(mixer)
            if task.causal and not (e.causal and (e.strictly_causal or model.get("allow_causal_leak"))):
                continue  # the protocol compares what the task allows (listed in the report's setup)
            base = {"kind": "findings", "setting": name, "mixer": mixer, "task": st.task, "task_args": st.args,
                    "model": model, "chance": task.chance, "claims": f.claims,
                    **({"score_by_task": True} if f.score_by_task else {}), **({"group": st.group} if st.group else {})}
            for lr in f.lrs:
                for wd in wds:
                    train = {**_merge(f.train, st.train), "lr": lr, **wd, "seed": f.seeds[0], "data_seed": f.data_seed}
                    tune.append({**base, "phase": "tune", "train": train,
                                 "key": f"findings/{name}/{mixer}/lr={lr:g}{_wd(wd)}/seed={f.seeds[0]}"})
            for rank, lr in beyond:
                for wd in wds:
                    train = {**_merge(f.train, st.train), "lr": lr, **wd, "seed": f.seeds[0], "data_seed": f.data_seed}
                    tune.append({**base, "phase": "extend", "extend": rank, "train": train,
                                 "key": f"findings/{name}/{mixer}/lr={lr:g}{_wd(wd)}/seed={f.seeds[0]}"})
            best = {"lr": "best", **({"weight_decay": "best"} if f.weight_decays else {})}
            for seed in f.seeds[1:]:
                train = {**_merge(f.train, st.train), **best, "seed": seed, "data_seed": f.data_seed}
                seeds.append({**base, "phase": "seed", "train": train,
                              "key": f"findings/{name}/{mixer}/best/seed={seed}"})
            for seed in f.seeds if f.extend_steps else ():
                train = {**_merge(f.train, st.train), **best, "seed": seed, "data_seed": f.data_seed,
                         "max_steps": f.extend_steps}
                longer.append({**base, "phase": "longer", "train": train,
                               "key": f"findings/{name}/{mixer}/longer/seed={seed}"})
            for seed in f.seeds[1:] if f.runner_up else ():
                train = {**_merge(f.train, st.train), "lr": "runnerup",
                         **({"weight_decay": "runnerup"} if f.weight_decays else {}), "seed": seed,
                         "data_seed": f.data_seed}
                second.append({**base, "phase": "runnerup", "train": train,
                               "key": f"findings/{name}/{mixer}/runnerup/seed={seed}"})
    return tune + seeds + longer + second


def _wd(wd: dict) -> str:
    """The weight decay's part of a tune case's key: ',wd=0.1' with a weight-decay grid."""
    return f",wd={wd['weight_decay']:g}" if wd else ""


def _merge(a: dict, b: dict) -> dict:
    """b over a, one level into dict values (mixer_args: {window: {...}} merges per mixer)."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _check_model(suite: str, case: dict) -> None:
    from zoo.config import ModelConfig, to_dict
    from zoo.model import mixer_kwargs

    where = f"suite {suite!r}: {case['kind']}.model"
    cfg = from_dict(ModelConfig, {**case["model"], "mixer": case["mixer"]}, where)
    mixer_kwargs(default_registry(), cfg.mixers, cfg.mixer_args, f"{where}.mixer_args")
    task = default_registry().build_task(case["task"], **case["task_args"])
    from zoo.model import ZooModel

    net = ZooModel(from_dict(ModelConfig, {**to_dict(cfg), **task.model_overrides(),
                                           "allow_causal_leak": True}, where))
    for i, block in enumerate(net.blocks):
        if getattr(block.mixer, "full_at", lambda n: False)(task.seq_len):
            raise ZooConfigError(
                f"{where}: {cfg.mixers[i]} covers the whole sequence of task {case['task']!r} (seq_len "
                f"{task.seq_len}) and would compute full attention ({block.mixer.extra_repr()}); give it a "
                f"smaller window or bucket in {case['kind']}.model.mixer_args.{cfg.mixers[i]}")
    for name in cfg.mixers:
        e = default_registry().mixer(name)
        if task.causal and e.causal and not e.strictly_causal and not cfg.allow_causal_leak:
            raise ZooConfigError(
                f"{where}: mixer {name!r} is causal in its mask only ({e.notes or 'not strictly causal'}); task "
                f"{case['task']!r} is causal. Drop it or set {case['kind']}.model.allow_causal_leak: true")
