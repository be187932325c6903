"""The findings protocol: a quality verdict is a distribution over tuned runs, not one run.

For every mixer x task setting of a ``findings`` suite:
  1. tune: one run per learning rate of the grid (init seed = the first seed), chosen on
     validation: among runs that reached the validation target the fewest steps to it, else
     the final validation accuracy (ties: lower validation loss; :func:`choice_score`);
  2. seeds: the chosen learning rate rerun with the other init seeds (the data seed is fixed,
     so every run of every mixer sees the same validation and test sets; training batches are
     fresh every step); a run of the chosen rate that ends its budget still improving is run
     again with the longer budget ``extend_steps`` (a fresh run: its cosine schedule spans the
     longer budget), and that run counts in its place;
  3. aggregate: mean, standard deviation and a 95 % interval (Student t) of the test accuracy,
     with flags: converged (reached the validation target, early-stopped), still improving
     (validation accuracy rose by more than ``IMPROVING`` over the last quarter of the run, and
     it did not converge), at chance (the mean is within a margin of the task's chance level),
     at floor (the same margin of the task's floor: what it yields without its skill, e.g.
     mqar's 1 / n_pairs), diverged (non-finite loss).
  4. claims: published results, each with its source, the settings that test it and a pass
     rule, evaluated on the aggregates: reproduced / not reproduced / inconclusive, with numbers.

Everything here is pure (rows in, tables out) so that tests exercise it on synthetic rows.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from zoo.errors import ZooConfigError, read_yaml, unknown

EDGE_TIE = 0.02  # an edge rate this close to the best on validation is not shown worse: extend past it
IMPROVING = 0.02  # rise in validation accuracy over the last quarter of a run that flags "still improving"
CHANCE_MARGIN = 0.02  # a mean within chance + max(this, 2 standard errors), most runs within this: "at chance"
SPLIT_GAP = 0.2  # a run stalled this far short of the validation target, beside one within it: seeds split

# two-sided 95 % Student t quantiles by degrees of freedom (n - 1)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(dof: int) -> float:
    if dof < 1:
        return math.nan
    if dof in _T95:
        return _T95[dof]
    below = max(k for k in _T95 if k <= dof) if dof < 30 else 30
    return _T95[below] if dof < 30 else 1.96 + (_T95[30] - 1.96) * 30 / dof


@dataclass
class Summary:
    """The aggregate of one mixer on one setting."""

    setting: str
    mixer: str
    lr: float | None
    values: list[float]
    chance: float
    flags: dict[str, int] = field(default_factory=dict)  # flag -> number of runs with it
    state_bytes: int | None = None
    # lr -> validation accuracy of its tune run; (lr, weight decay) -> it, with a weight-decay grid
    grid: dict = field(default_factory=dict)
    reached: dict = field(default_factory=dict)  # the grid's keys -> step its run reached the target (None: not)
    stale: int = 0  # seed runs made with another lr than today's choice (left out)
    floor: float | None = None  # accuracy without the task's skill (Task.floor), where above chance
    bounds: tuple[float, float] = (0.0, 1.0)  # the metric's range: accuracies
    edge: bool = False  # the chosen run did not converge and it, or a rate within EDGE_TIE of it, is an edge
    weight_decay: float | None = None  # the chosen weight decay, with a weight-decay grid
    stalled: int = 0  # runs that stalled (:func:`stalled`): beside a run that came near, the seeds split
    near: int = 0  # runs that ended within SPLIT_GAP of the validation target (or reached it)
    # why the seeds split, where the tuning's runner-up rate ran on every stalled seed: "init"
    # (each stalled there too), "rate" (one came near the target there); None: not known
    split_cause: str | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else math.nan

    @property
    def ci(self) -> tuple[float, float]:
        """95 % interval of the mean (Student t) within the metric's range ``bounds`` (an accuracy
        cannot leave [0, 1], however wide three split seeds make the t interval); a single run has
        none."""
        if self.n < 2:
            return (math.nan, math.nan)
        half = t95(self.n - 1) * self.std / math.sqrt(self.n)
        return (max(self.bounds[0], self.mean - half), min(self.bounds[1], self.mean + half))

    def _at_level(self, level: float) -> bool:
        """The runs sit at ``level``: the mean within max(``CHANCE_MARGIN``, 2 standard errors) of
        it, and more than half the runs each within ``CHANCE_MARGIN`` of it, and the seeds not
        split. Two standard errors of three split seeds span most of [0, 1], so the mean alone
        called 0.967 / 0.223 / 0.990 "at the floor 0.25"; a row that split is flagged SEEDS SPLIT
        instead, and 0.46 / 0.061 / 0.061 (two runs at mqar's floor, none at chance) reads AT FLOOR,
        not AT CHANCE."""
        if not self.values or self.split:
            return False
        se = self.std / math.sqrt(self.n) if self.n > 1 else 0.0
        runs_at = sum(v <= level + CHANCE_MARGIN for v in self.values)
        return self.mean <= level + max(CHANCE_MARGIN, 2 * se) and 2 * runs_at > self.n

    @property
    def at_chance(self) -> bool:
        return self._at_level(self.chance)

    @property
    def at_floor(self) -> bool:
        """At the task's floor (e.g. mqar's guess among the example's values) and not at chance:
        the mixer learned the task's format but not its skill."""
        if self.floor is None or self.at_chance:
            return False
        return self._at_level(self.floor)

    @property
    def split(self) -> bool:
        """Seeds split at the chosen rate: one run at least came within ``SPLIT_GAP`` of the
        validation target (:attr:`near`) and one at least stalled (:func:`stalled`). The rate was chosen
        on one seed and does not carry to the others, so a better-tuned rate could move the
        mean (ALiBi at 3e-3: one seed learned induction, two never did; at 1e-3 all three did)."""
        return self.near > 0 and self.stalled > 0

    def flag_text(self) -> str:
        parts = [f"{k} {v}/{self.n_runs}" for k, v in sorted(self.flags.items()) if v]
        if self.split:
            parts.append("SEEDS SPLIT" + {"init": " (init: stalled at the runner-up rate too)",
                                          "rate": " (rate: learned at the runner-up rate)"}.get(self.split_cause, ""))
        if self.at_chance:
            parts.append("AT CHANCE")
        if self.at_floor:
            parts.append(f"AT FLOOR {self.floor:.3f}")
        if self.edge:
            parts.append("LR AT EDGE")
        if self.stale:
            parts.append(f"{self.stale} stale seed run(s) left out")
        return ", ".join(parts) or "-"

    @property
    def n_runs(self) -> int:
        return self.n + self.flags.get("diverged", 0) + self.flags.get("failed", 0)


def run_flags(row: dict, target: float) -> dict[str, bool]:
    """Flags of one finished run: converged, still improving, diverged, failed."""
    status = row.get("status")
    if status == "diverged":
        return {"diverged": True}
    if status != "ok":
        return {"failed": True}
    curve = row["result"].get("val_curve") or []
    last = curve[-1][1] if curve else math.nan
    converged = bool(target) and last >= target
    improving = False
    if len(curve) >= 2 and not converged:
        end = curve[-1][0]
        earlier = [acc for step, acc in curve if step <= end - 0.25 * end] or [curve[0][1]]
        improving = last - earlier[-1] > IMPROVING
    return {"converged": converged, "still_improving": improving}


def val_score(row: dict) -> tuple[float, float]:
    """What a tune run is chosen by: (final validation accuracy, -final validation loss)."""
    if row.get("status") != "ok":
        return (-math.inf, -math.inf)
    r = row["result"]
    curve = r.get("val_curve") or []
    acc = curve[-1][1] if curve else r["metrics"].get("val/accuracy", -math.inf)
    return (acc, -r.get("val_loss", math.inf))


def near_target(row: dict, target: float) -> bool:
    """A finished run that ended within ``SPLIT_GAP`` of the validation target (or reached it)."""
    return bool(target) and row.get("status") == "ok" and val_score(row)[0] >= target - SPLIT_GAP


def stalled(row: dict, target: float) -> bool:
    """A run that diverged, or ended more than ``SPLIT_GAP`` short of the validation target
    without still improving."""
    flags = run_flags(row, target)
    return bool(flags.get("diverged")) or (bool(target) and row.get("status") == "ok" and not near_target(row, target)
                                           and not flags["still_improving"])


def steps_to_target(row: dict) -> int | None:
    """The first validation step at which a run reached its case's ``train.stop_at``, or None
    (no target, or never reached)."""
    target = row.get("case", {}).get("train", {}).get("stop_at") or 0.0
    if not target or row.get("status") != "ok":
        return None
    return next((step for step, acc in row["result"].get("val_curve") or [] if acc >= target), None)


def choice_score(row: dict) -> tuple:
    """What the tuning chooses a rate by. Runs that reached the validation target rank above
    those that did not, and among them the one that got there in the fewest steps wins (ties:
    lower validation loss). Their final accuracies do not decide: a run stops at the first
    validation above the target, so 0.997 against 0.999 there is noise, and the full run chose
    ALiBi's 3e-3 by it, a rate that reached the target at step 2500 of 3000 on the tuning seed
    (1e-3 took 1250) and never learned the task on two of three seeds. Runs short of the
    target rank by :func:`val_score`."""
    if row.get("status") != "ok":
        return (0, -math.inf, -math.inf)
    steps = steps_to_target(row)
    if steps is not None:
        return (1, -steps, val_score(row)[1])
    return (0, *val_score(row))


def lr_of(row: dict) -> float:
    """The learning rate a findings run used (a seed row's case says 'best')."""
    return row.get("lr", row["case"]["train"]["lr"])


def choice_of(row: dict) -> tuple[float, float | None]:
    """The (learning rate, weight decay) a findings run used; the weight decay is None where the
    suite sweeps none (the run took train.weight_decay as the suite or the trainer sets it)."""
    return lr_of(row), row.get("weight_decay", row["case"]["train"].get("weight_decay"))


def choice_text(choice: tuple[float, float | None] | None) -> str:
    if choice is None:
        return "none"
    return f"{choice[0]:g}" + (f", wd {choice[1]:g}" if choice[1] is not None else "")


def tuning_rows(rows: list[dict]) -> list[dict]:
    """The rows that choose the learning rate: the grid's and the extensions that ran."""
    return [r for r in rows if r.get("case", {}).get("phase") in ("tune", "extend") and r.get("status") != "skipped"]


def choose(tune_rows: list[dict]) -> tuple[float, float | None] | None:
    """The (learning rate, weight decay) of the best tune run by validation (:func:`choice_score`;
    :func:`choice_of`), or None when none finished."""
    ok = [r for r in tuning_rows(tune_rows) if r.get("status") == "ok"]
    if not ok:
        return None
    return choice_of(max(ok, key=choice_score))


def runner_up(tune_rows: list[dict]) -> tuple[float, float | None] | None:
    """The (learning rate, weight decay) the tuning ranks second (:func:`choice_score`), or None
    where fewer than two finished."""
    best: dict = {}
    for r in tuning_rows(tune_rows):
        if r.get("status") == "ok":
            c = choice_of(r)
            best[c] = max(best.get(c, choice_score(r)), choice_score(r))
    ranked = sorted(best, key=best.get, reverse=True)
    return ranked[1] if len(ranked) > 1 else None


def counted_runs(rows: list[dict], choice: tuple | None) -> list[dict]:
    """The runs of one mixer and setting that its numbers count, seed by seed: the first seed's
    tune run of the chosen rate and the other seeds' runs of it, each in its longer-budget
    rerun's place where that ran."""
    tune = tuning_rows(rows)
    chosen = [r for r in tune if choice_of(r) == choice]
    current = [r for r in rows if r["case"]["phase"] == "seed" and choice_of(r) == choice]
    longer = {r["case"]["train"]["seed"]: r for r in rows if r["case"]["phase"] == "longer"
              and r.get("status") in ("ok", "diverged") and choice_of(r) == choice}
    return [longer.get(r["case"]["train"]["seed"], r) for r in chosen + current]


def runner_up_needed(seed: int, rows: list[dict], target: float) -> str | None:
    """Whether a runner-up case must run for ``seed``, given the rows of its mixer and setting:
    None when it must, else why not. It must where the seeds split (:attr:`Summary.split`) and
    this seed's counted run (:func:`counted_runs`) is one that stalled: the tuning's second rate
    on that seed tells a split that comes from the rate chosen on another seed (it learns there)
    from one that comes from the init (it stalls there too). Only a second rate that came near
    the target on the tuning seed can tell: one that failed there too says nothing."""
    choice, second = choose(rows), runner_up(rows)
    if second is None:
        return "fewer than two rates tried: no runner-up"
    runs = counted_runs(rows, choice)
    mine = [r for r in runs if r["case"]["train"]["seed"] == seed]
    if not mine:
        return "no finished run of this seed at the chosen rate"
    if not stalled(mine[-1], target):
        return "its run at the chosen rate did not stall"
    if not any(near_target(r, target) for r in runs if r["case"]["train"]["seed"] != seed):
        return "no other seed came near the target at the chosen rate: the seeds did not split"
    if not _viable(rows, second, target):
        return (f"the runner-up rate {choice_text(second)} did not come near the target on the tuning seed either: "
                "it cannot tell the init from the rate")
    return None


def _viable(rows: list[dict], choice: tuple, target: float) -> bool:
    """The rate's tune run came near the validation target: a rate that fails the tuning seed
    too says nothing of another seed's init."""
    return any(near_target(r, target) for r in tuning_rows(rows) if choice_of(r) == choice)


def split_cause(rows: list[dict], choice: tuple | None, target: float) -> str | None:
    """Why the seeds split (see :attr:`Summary.split_cause`): each stalled seed's run at the
    runner-up rate (the first seed's tune run there; the others' runner-up runs) decides; None
    until every stalled seed has one."""
    second = runner_up(rows)
    if second is None or not _viable(rows, second, target):
        return None
    causes = []
    for run in counted_runs(rows, choice):
        if not stalled(run, target):
            continue
        seed = run["case"]["train"]["seed"]
        there = [r for r in rows if r["case"]["train"].get("seed") == seed and choice_of(r) == second
                 and r.get("status") in ("ok", "diverged") and r["case"]["phase"] in ("tune", "extend", "runnerup")]
        if not there:
            return None
        causes.append("rate" if near_target(there[-1], target) else "init")
    return ("rate" if "rate" in causes else "init") if causes else None


def choose_lr(tune_rows: list[dict]) -> float | None:
    """The learning rate of the best tune run by validation, or None when none finished."""
    choice = choose(tune_rows)
    return None if choice is None else choice[0]


def extension_needed(case: dict, tune_rows: list[dict]) -> str | None:
    """Whether an extension case (a rate beyond the grid) must run, given the tune rows of its
    mixer and setting so far: None when it must, else why not. It runs where the best run tried
    did not reach the validation target and the rates tried have not shown their edge on the
    case's side (the largest tried, for a rate above the grid) to be worse: the edge is the
    choice, or its validation accuracy lies within ``EDGE_TIE`` of the best (a plateau where
    every rate sits at the floor chooses among ties by noise, and a mixer that needs a larger
    rate, as Mamba does on mqar, would read as failing the task). A rate chosen at the edge, or
    tied with it, is not tuned. With a weight-decay grid, the rates are those tried at the
    case's weight decay, and it runs only where the best run has that weight decay."""
    ok = [r for r in tuning_rows(tune_rows) if r.get("status") == "ok"]
    if not ok:
        return "no finished tune run to extend"
    best = max(ok, key=choice_score)
    wd = case["train"].get("weight_decay")
    if choice_of(best)[1] != wd:
        return f"the runs tried chose weight decay {choice_of(best)[1]:g}, not this case's {wd:g}"
    ok = [r for r in ok if choice_of(r)[1] == wd]
    lr, tried = case["train"]["lr"], sorted(lr_of(r) for r in ok)
    edge = tried[-1] if lr > tried[-1] else tried[0] if lr < tried[0] else None
    if edge is None:
        return f"rate {lr:g} lies inside the rates tried ({', '.join(f'{x:g}' for x in tried)})"
    if run_flags(best, case["train"].get("stop_at", 0.0)).get("converged"):
        return f"the chosen rate {lr_of(best):g} reached the validation target"
    if lr_of(best) == edge:
        return None
    gap = val_score(best)[0] - max(val_score(r)[0] for r in ok if lr_of(r) == edge)
    if gap <= EDGE_TIE:
        return None
    return f"the rates tried chose {lr_of(best):g}, not their edge {edge:g} ({gap:.3f} lower on validation)"


def longer_needed(base: dict | None, target: float, siblings: list[dict] = ()) -> str | None:
    """Whether a longer-budget case must run, given the run of its seed at the chosen rate and
    the base budget (the tune run for the first seed, a seed run for the others) and the runs
    of the other seeds at that rate: None when it must, else why not. It must where that run
    ended still improving short of the target, or stalled (more than ``SPLIT_GAP`` short, flat)
    while another seed came within ``SPLIT_GAP`` of it (the seeds split): recall tasks sit on a
    plateau and then jump, and a seed that has not jumped yet looks flat."""
    if base is None:
        return "no finished run of this seed at the chosen rate"
    if base.get("status") != "ok":
        return f"its run at the base budget ended {base.get('status')}"
    flags = run_flags(base, target)
    curve = base["result"].get("val_curve") or []
    end = f"{curve[-1][1]:.3f} at step {curve[-1][0]}" if curve else "no validation curve"
    if flags.get("converged"):
        return f"its run at the base budget reached the validation target ({end})"
    if flags.get("still_improving"):
        return None
    if stalled(base, target) and any(near_target(r, target) for r in siblings):
        return None
    return f"its run at the base budget had stopped improving ({end})"


def not_needed(rows: list[dict]) -> str:
    """What a findings run's skipped rows stand for, e.g. '28 rates beyond the grid where the
    choice lay inside it; 5 longer budgets where the run had converged or stopped improving'."""
    longer = sum(r.get("status") == "skipped" and r.get("case", {}).get("phase") == "longer" for r in rows)
    second = sum(r.get("status") == "skipped" and r.get("case", {}).get("phase") == "runnerup" for r in rows)
    rates = sum(r.get("status") == "skipped" for r in rows) - longer - second
    return "; ".join(([f"{rates} rates beyond the grid where the choice lay inside it"] if rates else [])
                     + ([f"{longer} longer budgets where the run had converged or stopped improving"]
                        if longer else [])
                     + ([f"{second} runner-up rates where the seed's run had not stalled beside one that learned"]
                        if second else []))


def metric_of(metrics: dict, metric: str) -> float:
    """``metric`` from a run's metrics; ``test/accuracy`` of a task with several test sets (e.g.
    induction's test@64, test@256) is that of the first, the training length."""
    if metric in metrics:
        return metrics[metric]
    if metric == "test/accuracy":
        tests = sorted((k for k in metrics if k.startswith("test@") and k.endswith("/accuracy")),
                       key=lambda k: int(k.split("@")[1].split("/")[0]))
        if tests:
            return metrics[tests[0]]
    return math.nan


def findings_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("case", {}).get("kind") == "findings"]


def task_floor(case: dict) -> float | None:
    """The floor of the case's task (:attr:`zoo.tasks.base.Task.floor`) where it lies above the
    chance level; None where it does not, or where the task cannot be built here (a report
    never dies on its rows)."""
    from zoo.registry import default_registry

    try:
        floor = default_registry().build_task(case["task"], **case.get("task_args", {})).floor
    except Exception:
        return None
    return floor if floor > case.get("chance", 0.0) + 1e-12 else None


def summarize(rows: list[dict], metric: str = "test/accuracy") -> list[Summary]:
    """One Summary per (setting, mixer) from the rows of a findings suite."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in findings_rows(rows):
        groups.setdefault((r["case"]["setting"], r["case"]["mixer"]), []).append(r)
    out = []
    for (setting, mixer), rs in sorted(groups.items()):
        tune = tuning_rows(rs)
        choice = choose(tune)
        lr, wd = choice or (None, None)
        case = rs[0]["case"]
        chosen = [r for r in tune if choice_of(r) == choice]
        seeds = [r for r in rs if r["case"]["phase"] == "seed"]
        current = [r for r in seeds if choice_of(r) == choice]
        # a run of the chosen rate that ended still improving counts by its longer-budget rerun
        runs = counted_runs(rs, choice)
        # a weight-decay grid: seed cases that resolve it, or tune runs that differ in it
        swept = any(r["case"]["train"].get("weight_decay") == "best" for r in rs) or len(
            {choice_of(r)[1] for r in tune}) > 1
        s = Summary(setting, mixer, lr, [], chance=case.get("chance", 0.0), stale=len(seeds) - len(current),
                    grid={(choice_of(r) if swept else lr_of(r)): val_score(r)[0] for r in tune},
                    reached={(choice_of(r) if swept else lr_of(r)): steps_to_target(r) for r in tune},
                    floor=task_floor(case), weight_decay=wd if swept else None,
                    bounds=(0.0, 1.0) if metric.endswith("accuracy") else (-math.inf, math.inf))
        target = case["train"].get("stop_at", 0.0)
        rates = [lr_of(r) for r in tune if choice_of(r)[1] == wd]  # tried at the chosen weight decay
        if chosen and len(rates) > 1 and not run_flags(chosen[0], target).get("converged", False):
            # chosen at an edge of the rates tried, or tied there (extension_needed's rule)
            tied = [x for x in rates if val_score(max((r for r in tune if lr_of(r) == x and choice_of(r)[1] == wd),
                                                      key=val_score))[0] >= val_score(chosen[0])[0] - EDGE_TIE]
            s.edge = min(rates) in tied or max(rates) in tied
        for r in runs:
            if r["case"]["phase"] == "longer":
                s.flags["longer_budget"] = s.flags.get("longer_budget", 0) + 1
            flags = run_flags(r, target)
            for k, v in flags.items():
                s.flags[k] = s.flags.get(k, 0) + int(v)
            s.stalled += stalled(r, target)
            s.near += near_target(r, target)
            if r.get("status") == "ok":
                s.values.append(metric_of(r["result"]["metrics"], metric))
                s.state_bytes = r["result"].get("state_bytes", s.state_bytes)
        if s.split:
            s.split_cause = split_cause(rs, choice, target)
        out.append(s)
    return out


def ranking(summaries: list[Summary]) -> list[tuple[Summary, str]]:
    """Summaries of one setting best first, each with the ranks it could hold: from one plus
    the mixers whose 95 % interval lies wholly above its own, to the count of mixers less those
    whose interval lies wholly below ('1-2'). Overlap is not transitive: a wide interval can
    overlap two mixers that are apart, and neither of those then reads as possibly third."""
    ordered = sorted(summaries, key=lambda s: -s.mean if s.values else math.inf)
    scored = [s for s in ordered if s.values]

    def interval(s: Summary) -> tuple[float, float]:
        return s.ci if s.n > 1 else (s.mean, s.mean)

    out = []
    for i, s in enumerate(ordered):
        if not s.values:
            out.append((s, f"{i + 1}"))
            continue
        lo, hi = interval(s)
        above = sum(1 for o in scored if o is not s and not _overlap((lo, hi), interval(o)) and o.mean > s.mean)
        below = sum(1 for o in scored if o is not s and not _overlap((lo, hi), interval(o)) and o.mean < s.mean)
        first, last = above + 1, len(scored) - below
        out.append((s, f"{first}" if first == last else f"{first}-{last}"))
    return out


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    if any(math.isnan(v) for v in (*a, *b)):
        return False
    return a[0] <= b[1] and b[0] <= a[1]


# -- claims ----------------------------------------------------------------------------------------
RULES = ("at_least", "at_most", "decreases", "higher")
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


@dataclass
class Claim:
    name: str
    claim: str
    source: str
    rule: dict[str, Any]


def load_claims(path: str | Path) -> list[Claim]:
    path = Path(path)
    data = read_yaml(path, "claims file") or {}
    out = []
    for name, c in (data.get("claims") or {}).items():
        where = f"claim {name!r} in {path.name}"
        if not isinstance(c, dict) or {"claim", "source", "rule"} - c.keys():
            raise ZooConfigError(f"{where}: needs 'claim', 'source' and 'rule'")
        kind = c["rule"].get("kind")
        if kind not in RULES:
            raise unknown("rule kind", kind, RULES, where)
        learned = c["rule"].get("learned")
        if learned is not None and (kind not in ("at_least", "at_most") or isinstance(learned, bool)
                                    or not isinstance(learned, (int, float)) or not 0 < learned <= 1):
            raise ZooConfigError(f"{where}: 'learned' (the accuracy at the training length a run must reach to "
                                 f"count) is a number in (0, 1] on an at_least or at_most rule; got {learned!r} "
                                 f"on {kind}")
        out.append(Claim(name, c["claim"], c["source"], dict(c["rule"])))
    return out


def evaluate(claim: Claim, rows: list[dict]) -> tuple[str, str]:
    """(verdict, our numbers) for one claim, on the metric its rule names (default test
    accuracy; with ``learned``, an at_least or at_most rule counts only the runs whose test
    accuracy at the training length reached it). A missing mixer or setting, fewer than 3
    runs, or a run still improving where more budget could change the verdict make it
    inconclusive: a mean short of an ``at_least`` bar or under an ``at_most`` one; a
    ``decreases`` drop too small at a still-improving easier setting, or large against a
    still-improving harder one; a ``higher`` gap whose trailing mixer still improves. Seeds
    split at the chosen rate (:attr:`Summary.split`) count as still improving: a rate that
    carries to every seed could move the mean the same way; unless each stalled seed stalled
    at the tuning's runner-up rate too (:attr:`Summary.split_cause` "init"), where the mean stands."""
    rule = dict(claim.rule)
    kind = rule.pop("kind")
    metric = rule.pop("metric", "test/accuracy")
    by = {(s.setting, s.mixer): s for s in summarize(rows, metric)}

    def get(setting: str, mixer: str) -> Summary | None:
        s = by.get((setting, mixer))
        return s if s is not None and s.values else None

    def txt(s: Summary) -> str:
        lo, hi = s.ci
        ci = f" [{lo:.3f}, {hi:.3f}]" if s.n > 1 else ""
        rising = f", still improving {s.flags['still_improving']}/{s.n_runs}" if s.flags.get("still_improving") else ""
        split = (f", seeds split: {s.near} near the target, {s.stalled} stalled"
                 + {"init": " (at the runner-up rate too: the init, not the rate)",
                    "rate": " (one learned at the runner-up rate)"}.get(s.split_cause, "") if s.split else "")
        return f"{s.mixer} @ {s.setting}: {s.mean:.3f}{ci} (n={s.n}{rising}{split})"

    def improving(s: Summary) -> bool:
        """More budget (a run still improving) or a better-tuned rate (seeds split at the chosen
        one, unless the stalled seeds stalled at the runner-up rate too) could still move its mean."""
        return s.flags.get("still_improving", 0) > 0 or (s.split and s.split_cause != "init")

    if kind in ("at_least", "at_most"):
        v = float(rule["value"])
        learned = rule.get("learned")
        trained = {(x.setting, x.mixer): x for x in summarize(rows)} if learned is not None else {}
        parts, verdicts = [], []
        for setting in _list(rule.get("settings") or rule.get("setting")):
            s = get(setting, rule["mixer"])
            if s is None:  # missing: no verdict from it, but a present setting may still contradict
                parts.append(f"no finished runs of {rule['mixer']} @ {setting}")
                verdicts.append(INCONCLUSIVE)
                continue
            note = ""
            if learned is not None:  # a run that never learned the task says nothing of its extrapolation
                base = trained[(setting, rule["mixer"])].values  # the same runs, in the same order
                kept = [x for x, b in zip(s.values, base, strict=True) if b >= float(learned)]
                if len(kept) < s.n:
                    note = (f"; {s.n - len(kept)} of {s.n} runs left out: below {float(learned):g} at the "
                            "training length, so no evidence either way")
                if not kept:
                    parts.append(f"{rule['mixer']} @ {setting}: no run learned the task{note}")
                    verdicts.append(INCONCLUSIVE)
                    continue
                s = replace(s, values=kept, stalled=0)  # the runs that stalled are those left out
            parts.append(txt(s) + note)
            good = s.mean >= v if kind == "at_least" else s.mean <= v
            # a run still rising can still cross the bar: that decides an at_most rule that holds
            # and an at_least rule that does not; a rise cannot undo the other two outcomes
            if improving(s) and good == (kind == "at_most"):
                verdicts.append(INCONCLUSIVE)
            else:  # either way, on three seeds at least
                verdicts.append((REPRODUCED if good else NOT_REPRODUCED) if s.n >= 3 else INCONCLUSIVE)
        rule_text = f"mean {'>=' if kind == 'at_least' else '<='} {v}" + (
            f" over the runs that reached {float(learned):g} at the training length" if learned is not None else "")
        return _combine(verdicts), "; ".join(parts) + f" (rule: {rule_text})"
    if kind == "decreases":  # accuracy falls from the first to the last setting by at least `by`
        settings = _list(rule["settings"])
        parts, verdicts = [], []
        for mixer in _list(rule.get("mixers") or rule.get("mixer")):
            first, last = get(settings[0], mixer), get(settings[-1], mixer)
            if first is None or last is None:
                parts.append(f"no finished runs of {mixer} at {settings[0]} or {settings[-1]}")
                verdicts.append(INCONCLUSIVE)
                continue
            drop = first.mean - last.mean
            text = f"{mixer}: {first.mean:.3f} -> {last.mean:.3f} (drop {drop:+.3f})"
            if first.at_floor or first.at_chance:  # never learned the easier setting: its fall is the floor's
                level = f"floor {first.floor:.3f}" if first.at_floor else f"chance {first.chance:.3f}"
                parts.append(f"{text}, at its {level} already at {settings[0]}: no evidence either way")
                continue
            rising = [s.setting for s in (first, last) if s.flags.get("still_improving")]
            split = [s.setting for s in (first, last) if s.split]
            parts.append(text + (f", still improving at {' and '.join(rising)}" if rising else "")
                         + (f", seeds split at {' and '.join(split)}" if split else ""))
            separated = not _overlap(first.ci, last.ci) if first.n > 1 and last.n > 1 else False
            # more budget at the easier setting could widen the drop; at the harder one, close it
            # (a drop that is the harder setting's slower learning is not the claimed loss)
            if drop >= float(rule.get("by", 0.0)) and separated and not improving(last):
                verdicts.append(REPRODUCED)
            elif drop < float(rule.get("by", 0.0)) and (first.n >= 3 and last.n >= 3) and not improving(first):
                verdicts.append(NOT_REPRODUCED)
            else:
                verdicts.append(INCONCLUSIVE)
        return _combine(verdicts), "; ".join(parts) + f" (rule: drop >= {rule.get('by', 0.0)}, intervals apart)"
    if kind == "higher":  # mixer beats other by at least `by` on the setting, intervals apart
        s, o = get(rule["setting"], rule["mixer"]), get(rule["setting"], rule["other"])
        if s is None or o is None:
            missing = rule["mixer"] if s is None else rule["other"]
            return INCONCLUSIVE, f"no finished runs of {missing} @ {rule['setting']}"
        gap = s.mean - o.mean
        text = f"{txt(s)} vs {txt(o)} (rule: higher by >= {rule.get('by', 0.0)}, intervals apart)"
        # the one behind, still rising, could close the gap
        if gap >= float(rule.get("by", 0.0)) and s.n > 1 and o.n > 1 and not _overlap(s.ci, o.ci) and not improving(o):
            return REPRODUCED, text
        if gap < 0 and s.n >= 3 and o.n >= 3 and not _overlap(s.ci, o.ci) and not improving(s):
            return NOT_REPRODUCED, text
        return INCONCLUSIVE, text
    raise ZooConfigError(f"claim {claim.name!r}: rule kind {kind!r} is not evaluated on findings rows")


def _list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _combine(verdicts: list[str]) -> str:
    if NOT_REPRODUCED in verdicts:
        return NOT_REPRODUCED
    if INCONCLUSIVE in verdicts or not verdicts:
        return INCONCLUSIVE
    return REPRODUCED
