"""Reports from benchmark results: ``report.md`` with leaderboards, growth and plots.

``zoo report DIR_OR_FILES...`` merges result files (shards included; the last row of a key
wins) into one report; ``zoo report A B --compare`` writes B's numbers as ratios to A's.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from pathlib import Path

from zoo.findings import not_needed
from zoo.measure import loglog_slope
from zoo.sweep import SKIPPED


def _ok(rows, kind):
    return [r for r in rows if r.get("status") == "ok" and r["case"]["kind"] == kind]


def _number(v, positive: bool = False) -> bool:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return ok and (v > 0 if positive else True)


# What each kind of finished row must carry for its section: (where, field, check)
_NEEDS = {
    "speed": [("case", "mixer", str), ("case", "length", int), ("case", "mode", str),
              ("result", "seconds", "positive"), ("result", "tokens_per_s", "positive")],
    "decode": [("case", "mixer", str), ("case", "context", int), ("result", "seconds_per_token", "positive"),
               ("result", "state_bytes", "number")],
    "quality": [("case", "mixer", str), ("case", "task", str), ("result", "metrics", dict),
                ("result", "params", "number")],
    "extrapolation": [("case", "position", str), ("case", "task", str), ("case", "mixer", str),
                      ("result", "metrics", dict)],
    "findings": [("case", "mixer", str), ("case", "setting", str), ("result", "metrics", dict)],
}


def screen(rows: list) -> tuple[list[dict], list[str]]:
    """The rows the report can use, and why each other one cannot (a row from another version,
    edited by hand, or cut short). A report is written whatever the rows hold."""
    usable, why = [], []
    for i, r in enumerate(rows):
        name = str(r.get("key", f"row {i + 1}")) if isinstance(r, dict) else f"row {i + 1}"
        if not (isinstance(r, dict) and isinstance(r.get("key"), str) and isinstance(r.get("case"), dict)
                and isinstance(r["case"].get("kind"), str) and isinstance(r.get("status"), str)):
            why.append(f"{name}: not a result row (needs a text key, a case with its kind and a status)")
            continue
        if r["status"] == "ok":
            missing = []
            for where, field, check in _NEEDS.get(r["case"]["kind"], []):
                v = (r.get(where) or {}).get(field) if isinstance(r.get(where), dict) else None
                good = (_number(v, positive=True) if check == "positive" else _number(v) if check == "number"
                        else isinstance(v, check) and not isinstance(v, bool))
                if not good:
                    missing.append(f"{where}.{field}={v!r}")
            if missing:
                why.append(f"{name}: {', '.join(missing)}")
                continue
        usable.append({**r, "env": r["env"] if isinstance(r.get("env"), dict) else {}})
    return usable, why


def cell(text) -> str:
    """Text for one Markdown table cell: one line, its pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def fence(text: str) -> list[str]:
    """A code block holding ``text`` whatever backticks it contains (its fence is longer)."""
    ticks = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return [ticks, text, ticks]


def _fmt(v: float, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{suffix}{unit}"
    return f"{v:.3g}{unit}"


def speed_table(rows: list[dict], mode: str):
    """{mixer: {length: row}} for one mode."""
    table: dict[str, dict[int, dict]] = defaultdict(dict)
    for r in _ok(rows, "speed"):
        if r["case"]["mode"] == mode:
            table[r["case"]["mixer"]][r["case"]["length"]] = {**r["result"], "mixer_kind": r["case"].get("mixer_kind")}
    return table


def crossover(ours: dict[int, dict], ref: dict[int, dict]) -> str:
    """Shortest measured length from which ``ours`` is faster than ``ref`` (log-log interpolation)."""
    lengths = sorted(set(ours) & set(ref))
    ratio = [(n, ours[n]["seconds"] / ref[n]["seconds"]) for n in lengths]
    for k, (n, q) in enumerate(ratio):
        if q < 1:
            if k == 0:
                return f"<= {n}"
            (n0, q0) = ratio[k - 1]
            t = math.log(q0) / (math.log(q0) - math.log(q))  # where log ratio crosses 0
            return f"~{round(math.exp(math.log(n0) + t * (math.log(n) - math.log(n0))))}"
    return f"> {lengths[-1]}" if lengths else "-"


def write_report(rows: list[dict], out_dir: Path, command: str = "") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    rows, unusable = screen(rows)
    ok = [r for r in rows if r.get("status") == "ok"]
    suites = sorted({r.get("suite", "?") for r in rows})
    lines += [f"# zoo bench report: {', '.join(suites)}", ""]
    made: dict[str, int] = {}  # the command behind each row (a rerun of some cases adds one)
    for r in rows:
        if r.get("command"):
            made[str(r["command"])] = made.get(str(r["command"]), 0) + 1
    if not made and command:
        made = {command: len(rows)}
    if len(made) == 1:
        lines += ["Produced by:", "", *fence(next(iter(made))), ""]
    elif made:
        lines += ["Produced by (in the order they ran; the cases each produced):", "",
                  *fence("\n".join(f"{c}   # {n} case{'s' if n != 1 else ''}" for c, n in made.items())), ""]
    if ok:
        env = ok[0]["env"]
        lines += ["## Environment", "", "| | |", "|---|---|"]
        lines += [f"| {cell(k)} | {cell(v)} |" for k, v in env.items()]
        timed = any(r["case"]["kind"] in ("speed", "decode") for r in ok)
        skipped = sum(r.get("status") == "skipped" for r in rows)
        lines += ["", f"{len(ok)} of {len(rows) - skipped} cases ran"
                  + (f" ({skipped} more not needed: {not_needed(rows)})"
                     if skipped else "")
                  + ("; times are medians of `torch.utils.benchmark` blocks and hold only for this machine; "
                     "ratios are the portable part." if timed else "; the environment is the first row's."),
                  "", compute_time(ok), ""]
        lines += _where_section(ok)
    lines += _findings_section(rows, out_dir)
    lines += _quality_section(rows, out_dir)
    lines += _speed_section(rows, out_dir)
    lines += _decode_section(rows)
    lines += _extrapolation_section(rows)
    if SKIPPED:
        lines += [f"{len(SKIPPED)} unreadable line(s) in the results were skipped: {', '.join(SKIPPED[:20])}", ""]
    failed = [r for r in rows if r.get("status") not in ("ok", "skipped")]
    if failed:
        lines += ["## Cases that did not finish", "", "| case | status | error |", "|---|---|---|"]
        for r in failed:
            err = (r.get("error") or "").strip().splitlines()
            lines.append(f"| {cell(r['key'])} | {cell(r.get('status'))} | {cell((err[-1] if err else '')[:160])} |")
        lines.append("")
    if unusable:
        lines += ["## Rows the report could not use", ""] + [f"- {cell(w)}" for w in unusable] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    write_csv(rows, out_dir / "results.csv")
    return path


def write_csv(rows: list[dict], path: Path) -> Path:
    """One line per case for pandas users: key, status, the case's settings and the main
    numbers as flat columns (nested values dotted: case.mixer, result.metrics.test/accuracy)."""
    import csv

    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            elif not isinstance(v, list):  # curves stay in results.jsonl
                out[f"{prefix}{k}"] = v
        return out

    flats = [flat({k: v for k, v in r.items() if k not in ("traceback", "command")}) for r in rows]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    first = [k for k in ("key", "status", "case.kind", "case.mixer") if k in keys]
    keys = first + [k for k in keys if k not in first]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(flats)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _kv(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "defaults"


def mixer_color(name: str):
    """One colour per mixer across every panel and report: its place in the registry."""
    from zoo.registry import CHANNEL, SEQUENCE, default_registry

    reg = default_registry()
    names = reg.names(SEQUENCE) + reg.names(CHANNEL)
    i = names.index(name) if name in names else len(names) + sum(map(ord, name))
    plt = _plt()  # 18 distinct colours: tab10, then Dark2's (the registry has more than 10 mixers)
    palette = [plt.get_cmap("tab10")(k) for k in range(10)] + [plt.get_cmap("Dark2")(k) for k in range(8)]
    return palette[i % len(palette)]


def _rank_key(task: str):
    """Sort key of a quality row by the task's registry `metric` (accuracy: higher first; bits per
    char, perplexity, loss: lower first)."""
    from zoo.registry import TASKS, default_registry

    try:
        metric = default_registry().get(TASKS, task).metric or "accuracy"
    except Exception:  # a task the registry no longer has: rank by accuracy
        metric = "accuracy"
    sign = -1 if metric == "accuracy" else 1
    return lambda m: sign * m.get(f"test/{metric}", m.get("test/accuracy", 0) if metric == "accuracy" else math.inf)


def _findings_section(rows, out_dir):
    from zoo import findings as fd

    frows = fd.findings_rows(rows)
    if not frows:
        return []
    summaries = fd.summarize(rows)
    c0 = next((r["case"] for r in frows if r["case"]["phase"] not in ("longer", "runnerup")), frows[0]["case"])
    longer = [r for r in frows if r["case"]["phase"] == "longer"]
    longer_ran = sum(r.get("status") not in ("skipped", None) for r in longer)
    second = [r for r in frows if r["case"]["phase"] == "runnerup"]
    second_ran = sum(r.get("status") not in ("skipped", None) for r in second)
    lrs = sorted({r["case"]["train"]["lr"] for r in frows if r["case"]["phase"] == "tune"})
    wds = sorted({fd.choice_of(r)[1] for r in frows if r["case"]["phase"] == "tune"} - {None})
    swept = any(r["case"]["train"].get("weight_decay") == "best" for r in frows) or len(wds) > 1
    beyond = sorted({r["case"]["train"]["lr"] for r in frows if r["case"]["phase"] == "extend"})
    ran = sorted({fd.lr_of(r) for r in fd.tuning_rows(frows) if r["case"]["phase"] == "extend"})
    seeds = sorted({r["case"]["train"]["seed"] for r in frows})
    train = {k: v for k, v in c0["train"].items() if k not in ("lr", "seed", "data_seed")}
    lines = ["## Findings", "",
             f"Protocol (zoo/findings.py): per mixer and setting, a learning-rate grid {lrs}"
             + (f" crossed with weight decays {wds}" if swept else "") + f" on init seed {seeds[0]}"
             + (f", extended by {beyond} (nearest first) where the rates tried chose their edge without reaching the "
                f"validation target ({'run for some: ' + str(ran) if ran else 'none run so far'})" if beyond else "")
             + ", chosen on validation (among runs that reached the validation target, the fewest steps to it; "
               "else the final validation accuracy); the chosen rate rerun on init seeds "
             + (f"{seeds[1:]}" if seeds[1:] else "(none in these results: a suite of one seed, or seed runs still "
                "to come; the numbers are the tuning runs alone)")
             + (f"; a run of the chosen rate that ended its budget still improving run again with "
                f"{longer[0]['case']['train']['max_steps']} steps (a fresh run, its schedule spanning them), which "
                f"counts in its place ({longer_ran} so far)" if longer else "")
             + ("; where the seeds split, the tuning's runner-up rate run on each stalled seed (the first "
                f"seed's is its tune run), which tells the init from the rate ({second_ran} so far)" if second else "")
             + "; data seed "
             f"{c0['train'].get('data_seed')} for every run (same validation and test sets, fresh training batches). "
             f"Test accuracy: mean, standard deviation and 95 % interval (Student t, clipped to [0, 1]) over the "
             "seeds. Budget: "
             f"{_kv(train)}; model: {_kv(c0.get('model', {}))}. Flags count runs: converged = reached the "
             f"validation target; still_improving = validation accuracy rose by more than {fd.IMPROVING} over the "
             "last quarter of the run; "
             + ("longer_budget = the run counted is its longer-budget rerun; " if longer else "")
             + f"AT CHANCE = mean within max({fd.CHANCE_MARGIN}, 2 standard errors) of the chance level and "
             f"most runs within {fd.CHANCE_MARGIN} of it, seeds not split (AT FLOOR: the same at the task's floor); "
             f"SEEDS SPLIT = at the chosen rate one run at least ended within {fd.SPLIT_GAP} of the validation "
             f"target and one at least stalled more than {fd.SPLIT_GAP} short of it without still improving, or "
             "diverged (a claim reads it as still improving; the stalled seed gets the longer budget"
             + ("; init: each stalled seed stalled at the runner-up rate too, and a claim reads the mean as it "
                "stands; rate: one learned there" if second else "") + "); "
             "LR AT EDGE = the chosen run did not converge and the smallest or largest rate tried is the chosen one "
             f"or within {fd.EDGE_TIE} of it on validation (not tuned). "
             "Rank: the range a mixer could hold, from one plus the mixers whose interval lies wholly above "
             "its own to the count less those wholly below (overlapping intervals are never ordered).", ""]
    by_setting = defaultdict(list)
    for s_ in summaries:
        by_setting[s_.setting].append(s_)
    tasks = {r["case"]["setting"]: (r["case"]["task"], r["case"]["task_args"], r["case"].get("model", {}))
             for r in frows}
    for setting, ss in sorted(by_setting.items()):
        task, args, model = tasks[setting]
        lines += [f"### {setting}: {task} ({_kv(args)})", "",
                  f"chance {ss[0].chance:.3f}"
                  + (f"; floor {ss[0].floor:.3f} (reachable without the task's skill; AT FLOOR flags it)"
                     if ss[0].floor is not None else "")
                  + (f"; model {_kv(model)}" if model != c0.get("model", {}) else ""), "",
                  "| rank | mixer | lr | runs | test accuracy | 95 % interval | flags | state bytes | val acc per lr "
                  "(@ step it reached the target) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s_, rank in fd.ranking(ss):
            lo, hi = s_.ci
            acc = f"{s_.mean:.3f} ± {s_.std:.3f}" if s_.n > 1 else (f"{s_.mean:.3f}" if s_.values else "-")
            ci = f"[{lo:.3f}, {hi:.3f}]" if s_.n > 1 else "-"
            grid = ", ".join(f"{fd.choice_text(k) if isinstance(k, tuple) else f'{k:g}'}: {v:.2f}"
                             + (f" @{s_.reached[k]}" if s_.reached.get(k) is not None else "")
                             for k, v in sorted(s_.grid.items(), key=lambda kv: kv[0] if isinstance(kv[0], tuple)
                                                else (kv[0],)))
            state = _fmt(s_.state_bytes, "B") if s_.state_bytes else "-"
            lr = "None" if s_.lr is None else fd.choice_text((s_.lr, s_.weight_decay))
            lines.append(f"| {rank} | {s_.mixer} | {lr} | {s_.n} | {acc} | "
                         f"{ci} | {s_.flag_text()} | {state} | {grid} |")
        lines.append("")
    if c0.get("score_by_task"):
        groups = {r["case"]["setting"]: r["case"].get("group") or r["case"]["task"] for r in frows}
        lines += _task_scores(summaries, groups)
    lines += _findings_plots(summaries, tasks, out_dir)
    lines += _claims_section(rows, c0.get("claims", ""))
    return lines


def _task_scores(summaries, groups: dict[str, str]) -> list[str]:
    """MAD's score: per mixer and task (a setting's ``group``, else its task), the mean over the
    task's settings of the test accuracy (each setting's mean over its seeds); a task with
    settings still missing says how many it has."""
    settings = defaultdict(set)
    for st, group in groups.items():
        settings[group].add(st)
    by = {(s_.setting, s_.mixer): s_ for s_ in summaries if s_.values}
    mixers = sorted({s_.mixer for s_ in summaries})
    names = sorted(settings)
    lines = ["### Score per task", "",
             "Each mixer's mean test accuracy over a task's settings (MAD's score per task); where settings have no "
             "finished runs yet, the mean of those that have, with their count.", "",
             "| mixer | " + " | ".join(names) + " | mean over tasks |", "|---" * (len(names) + 2) + "|"]
    for m in mixers:
        cells, means = [], []
        for t in names:
            got = [by[st, m].mean for st in sorted(settings[t]) if (st, m) in by]
            if not got:
                cells.append("-")
                continue
            mean = sum(got) / len(got)
            whole = len(got) == len(settings[t])
            cells.append(f"{mean:.3f}" + ("" if whole else f" ({len(got)} of {len(settings[t])})"))
            if whole:
                means.append(mean)
        overall = f"{sum(means) / len(means):.3f}" if len(means) == len(names) else "-"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {overall} |")
    return lines + [""]


def _lines_along(x: str, varying: list[str], values: dict) -> dict[tuple, list[str]]:
    """Settings that agree on every varying parameter but ``x``, with ``x`` a number in each and
    at least two values of it: the lines of a panel with ``x`` on its axis, keyed by the rest."""
    out = defaultdict(list)
    for st, v in values.items():
        if isinstance(v.get(x), (int, float)) and not isinstance(v.get(x), bool):
            out[tuple((k, str(v.get(k))) for k in varying if k != x)].append(st)
    return {g: sts for g, sts in out.items() if len({values[st][x] for st in sts}) > 1}


def _numbers_first(item) -> list:  # panels ordered by their fixed values, numbers as numbers
    return [(k, float(v)) if v.replace(".", "", 1).isdigit() else (k, math.inf, v) for k, v in item[0]]


def findings_panels(summaries, tasks) -> list[tuple[str, str, list, dict]]:
    """The difficulty panels of the findings plot: (title, x key, summaries, each setting's
    parameters). Per task, the x axis is a numeric parameter (task argument or ``model.*``) that
    varies across its settings: the model width where it varies (Zoology's Fig. 2), else the one
    that puts most settings on one line. Settings that differ in anything else (another sequence
    length, another query distribution) get a panel of their own, titled by what they hold fixed,
    so no line joins settings that differ in more than its axis; a panel needs two settings."""
    by_task = defaultdict(list)
    for s_ in summaries:
        by_task[tasks[s_.setting][0]].append(s_)
    panels = []
    for task, ss in sorted(by_task.items()):
        settings = sorted({s_.setting for s_ in ss})
        values = {st: {**tasks[st][1], **{f"model.{m}": v for m, v in tasks[st][2].items()}} for st in settings}
        keys = sorted({k for st in settings for k in values[st]})
        varying = [k for k in keys if len({str(values[st].get(k)) for st in settings}) > 1]
        lines = {x: _lines_along(x, varying, values) for x in varying}
        candidates = [x for x in varying if lines[x]]
        if not candidates:
            continue
        x = "model.d_model" if "model.d_model" in candidates else max(
            candidates, key=lambda k: max(len(v) for v in lines[k].values()))
        for fixed, sts in sorted(lines[x].items(), key=_numbers_first):
            named = [f"{k}={v}" for k, v in fixed if v != "None"]  # None: left at the task's default
            title = task + (f" ({', '.join(named)})" if named else "")
            panels.append((title, x, [s_ for s_ in ss if s_.setting in sts], values))
    return panels


def _findings_plots(summaries, tasks, out_dir):
    """Accuracy against each task's difficulty axis (:func:`findings_panels`) and against
    decode-state size, one colour per mixer, 95 % error bars."""
    plt = _plt()
    panels = findings_panels(summaries, tasks)
    with_state = any(s_.values and s_.state_bytes for s_ in summaries)  # none: no mixer decodes
    if not panels and not with_state:
        return []
    n = len(panels) + with_state
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.6), squeeze=False)
    for ax, (title, key, ss, values) in zip(axes[0], panels, strict=False):
        for mixer in sorted({s_.mixer for s_ in ss}):
            pts = sorted(((values[s_.setting][key], s_) for s_ in ss if s_.mixer == mixer and s_.values),
                         key=lambda p: p[0])
            if not pts:
                continue
            err = [[p[1].mean - p[1].ci[0] if p[1].n > 1 else 0 for p in pts],
                   [p[1].ci[1] - p[1].mean if p[1].n > 1 else 0 for p in pts]]
            ax.errorbar([p[0] for p in pts], [p[1].mean for p in pts], yerr=err, marker="o", capsize=3,
                        label=mixer, color=mixer_color(mixer))
        ax.axhline(ss[0].chance, color="grey", linestyle=":", label="chance")
        floors = sorted({(values[s_.setting][key], s_.floor) for s_ in ss if s_.floor is not None})
        if floors:  # e.g. mqar's guess among the example's values, 1 / n_pairs
            ax.plot([f[0] for f in floors], [f[1] for f in floors], color="grey", linestyle="--", label="floor")
        ax.set_xscale("log", base=2)
        ticks = sorted({values[s_.setting][key] for s_ in ss})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(key)
        ax.set_ylabel("test accuracy (mean, 95 % interval)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    if not with_state:
        return _save_findings_plot(fig, out_dir)
    ax = axes[0][-1]
    marker = {t: "osD^vP*X"[i % 8] for i, t in enumerate(sorted({tasks[s_.setting][0] for s_ in summaries}))}
    for mixer in sorted({s_.mixer for s_ in summaries}):
        for task, m in marker.items():  # one colour per mixer, one marker per task
            pts = [(s_.state_bytes, s_.mean) for s_ in summaries
                   if s_.mixer == mixer and tasks[s_.setting][0] == task and s_.values and s_.state_bytes]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=mixer_color(mixer), marker=m)
        ax.scatter([], [], color=mixer_color(mixer), label=mixer)
    for task, m in marker.items():
        ax.scatter([], [], color="grey", marker=m, label=task)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("decode state (bytes, batch 1, at the task length)")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_title("accuracy against state size")
    ax.legend(fontsize=7)
    return _save_findings_plot(fig, out_dir)


def _save_findings_plot(fig, out_dir) -> list[str]:
    fig.tight_layout()
    fig.savefig(out_dir / "findings.png", dpi=110)
    _plt().close(fig)
    return ["![findings](findings.png)", ""]


def _claims_section(rows, claims_path: str):
    from zoo import findings as fd

    if not claims_path:
        return []
    try:
        claims = fd.load_claims(_claims_file(claims_path))
    except Exception as e:  # a report never dies on its inputs
        return [f"Claims file {claims_path!r} could not be read: {e}", ""]
    lines = ["### Published claims", "", "| claim | source | ours | verdict |", "|---|---|---|---|"]
    for c in claims:
        try:
            verdict, ours = fd.evaluate(c, rows)
        except Exception as e:
            verdict, ours = fd.INCONCLUSIVE, f"could not be evaluated: {e}"
        lines.append(f"| {c.claim} | {c.source} | {ours} | **{verdict}** |")
    return lines + [""]


def _claims_file(path: str) -> Path:
    from zoo.suite import SUITES_DIR

    p = Path(path)
    return p if p.is_file() or p.is_absolute() else SUITES_DIR / path


def _chance(task: str, args: dict) -> float | None:
    """The task's chance accuracy (its ``chance``), or None when the task cannot be built here."""
    from zoo.registry import default_registry

    try:
        return float(default_registry().build_task(task, **args).chance)
    except Exception:  # a task the registry no longer has, or arguments it no longer takes
        return None


def _quality_section(rows, out_dir):
    q = _ok(rows, "quality")
    if not q:
        return []
    seeds = sorted({r["case"].get("train", {}).get("seed", 0) for r in q})
    lines = ["## Quality", "", "Every mixer trained with the same model size, budget, learning rate and data per "
             f"task (`zoo.train.fit`), one run each (init seed {', '.join(map(str, seeds))}); test metrics on "
             "held-out data. No learning-rate tuning, one seed, a short budget: a same-budget check, not a "
             "ranking (the findings suite, docs/findings.md, is the protocol for verdicts).", ""]
    by_task = defaultdict(list)
    for r in q:
        by_task[r["case"]["task"]].append(r)
    plt = _plt()
    fig, axes = plt.subplots(1, len(by_task), figsize=(5 * len(by_task), 3.5), squeeze=False)
    fig2, axes2 = plt.subplots(1, len(by_task), figsize=(5 * len(by_task), 3.5), squeeze=False)
    for ax, ax2, (task, rs) in zip(axes[0], axes2[0], sorted(by_task.items()), strict=True):
        rank = _rank_key(task)  # by the task's registry metric
        rs.sort(key=lambda r, rank=rank: rank(r["result"]["metrics"]))
        budget = rs[0]["case"].get("train", {})
        chance = _chance(task, rs[0]["case"].get("task_args", {}))
        lines += [f"### {task} ({_kv(budget)})", "",
                  f"task: {_kv(rs[0]['case'].get('task_args', {}))}; model: {_kv(rs[0]['case'].get('model', {}))}; "
                  f"chance accuracy {_fmt(chance)}", "",
                  "| mixer | test accuracy | test loss | params | steps | train s |", "|---|---|---|---|---|---|"]
        for r in rs:
            m = r["result"]["metrics"]
            lines.append(f"| {r['case']['mixer']} | {m.get('test/accuracy', float('nan')):.4f} | "
                         f"{m.get('test/loss', float('nan')):.4f} | {_fmt(r['result']['params'])} | "
                         f"{r['result']['steps']} | {r['result']['train_seconds']:.1f} |")
            curve = r["result"].get("loss_curve") or []
            if curve:
                ax2.plot([c[0] for c in curve], [c[1] for c in curve], label=r["case"]["mixer"],
                         color=mixer_color(r["case"]["mixer"]))
        lines.append("")
        ax.bar([r["case"]["mixer"] for r in rs], [r["result"]["metrics"].get("test/accuracy", 0) for r in rs],
               color=[mixer_color(r["case"]["mixer"]) for r in rs])
        if chance is not None:
            ax.axhline(chance, color="gray", linestyle=":", label="chance")
            ax.legend(fontsize=7)
        ax.set_title(f"{task}: test accuracy")
        ax.set_ylim(0, 1)
        ax.tick_params(axis="x", rotation=45)
        ax2.set_title(f"{task}: training loss")
        ax2.set_xlabel("step")
        ax2.set_yscale("log")
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "quality_accuracy.png", dpi=110)
    fig2.tight_layout()
    fig2.savefig(out_dir / "quality_loss_curves.png", dpi=110)
    plt.close("all")
    return lines + ["![accuracy](quality_accuracy.png)", "", "![loss curves](quality_loss_curves.png)", ""]


def _speed_section(rows, out_dir):
    modes = sorted({r["case"]["mode"] for r in _ok(rows, "speed")})
    if not modes:
        return []
    lines = ["## Speed and memory", ""]
    plt = _plt()
    for mode in modes:
        table = speed_table(rows, mode)
        lengths = sorted({n for t in table.values() for n in t})
        sample = next(iter(next(iter(table.values())).values()))
        dtype = sample.get("dtype", "?")
        lines += [f"### {mode.replace('_', '+')} (tokens/s; batch and width as in the suite, dtype {dtype})", "",
                  "| mixer | " + " | ".join(str(n) for n in lengths)
                  + " | time slope | crossover vs softmax (sequence mixers) |",
                  "|---|" + "---|" * len(lengths) + "---|---|"]
        ref = table.get("softmax", {})
        for mixer, t in sorted(table.items()):
            ns = sorted(t)
            slope = loglog_slope(ns, [t[n]["seconds"] for n in ns]) if len(ns) > 1 else float("nan")
            sequence = next(iter(t.values())).get("mixer_kind") == "sequence_mixers"
            cross = crossover(t, ref) if ref and sequence and mixer != "softmax" else "-"
            cells = " | ".join(_fmt(t[n]["tokens_per_s"]) + _contended(t[n]) if n in t else "-" for n in lengths)
            lines.append(f"| {mixer} | {cells} | {slope:.2f} | {cross} |")
        lines += _contention_note([r for t in table.values() for r in t.values()])
        memory = [("peak_bytes", "peak memory increase of the case's process (CUDA: max_memory_allocated; "
                   "CPU: VmHWM)")]
        if mode == "forward_backward":
            memory.append(("saved_bytes", "bytes saved for backward (exact, machine-free)"))
        for key, what in memory:
            lines += ["", f"{what}; B, with the log-log slope over lengths:", "",
                      "| mixer | " + " | ".join(str(n) for n in lengths) + " | slope |",
                      "|---|" + "---|" * len(lengths) + "---|"]
            for mixer, t in sorted(table.items()):
                ns = [n for n in sorted(t) if (t[n].get(key) or 0) > 0]
                slope = loglog_slope(ns, [t[n][key] for n in ns]) if len(ns) > 1 else float("nan")
                cells = " | ".join(_fmt(t[n].get(key), "B") if n in t else "-" for n in lengths)
                lines.append(f"| {mixer} | {cells} | {slope:.2f} |")
        key = memory[-1][0]
        what = "bytes saved for backward (B)" if key == "saved_bytes" else "peak memory increase (B)"
        passes = 3 if mode == "forward_backward" else 1  # backward ~ 2x forward (PaLM's, nanoGPT's rule)
        lines += ["", "forward FLOPs from each mixer's own formula (2 per multiply-add; `flops(batch, length)`, "
                  "checked against FlopCounterMode in the tests; \"not counted\": the mixer has no formula), "
                  f"and the achieved rate, {passes} x forward FLOPs per second"
                  + (" (backward counted as twice the forward)" if passes == 3 else "") + ":", "",
                  "| mixer | " + " | ".join(f"FLOPs @{n}" for n in lengths) + " | "
                  + " | ".join(f"GFLOP/s @{n}" for n in lengths) + " |", "|---|" + "---|" * (2 * len(lengths))]
        for mixer, t in sorted(table.items()):
            lines.append(f"| {mixer} | " + " | ".join(_flop_count(t.get(n)) for n in lengths) + " | "
                         + " | ".join(_flop_rate(t.get(n), passes) for n in lengths) + " |")
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for mixer, t in sorted(table.items()):
            ns = sorted(t)
            a1.plot(ns, [t[n]["seconds"] for n in ns], marker="o", label=mixer, color=mixer_color(mixer))
            mem = [(n, t[n].get(key) or 0) for n in ns if (t[n].get(key) or 0) > 0]
            if mem:
                a2.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=mixer, color=mixer_color(mixer))
        for ax, title in ((a1, "time per call (s)"), (a2, what)):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length")
            ax.set_title(f"{mode.replace('_', '+')}: {title}")
        a1.legend(fontsize=7)
        fig.tight_layout()
        png = f"speed_{mode}.png"
        fig.savefig(out_dir / png, dpi=110)
        plt.close(fig)
        lines += ["", f"![{mode}]({png})", ""]
    return lines


def _decode_section(rows):
    d = _ok(rows, "decode")
    if not d:
        return []
    table = defaultdict(dict)
    for r in d:
        table[r["case"]["mixer"]][r["case"]["context"]] = r["result"]
    ctxs = sorted({n for t in table.values() for n in t})
    lines = ["## Decoding (one token after a context of N tokens)", "",
             "| mixer | " + " | ".join(f"us/token @{n}" for n in ctxs) + " | " + " | ".join(f"state @{n}" for n in ctxs)
             + " |", "|---|" + "---|" * (2 * len(ctxs))]
    for mixer, t in sorted(table.items()):
        us = " | ".join(f"{t[n]['seconds_per_token'] * 1e6:.0f}{_contended(t[n])}" if n in t else "-" for n in ctxs)
        st = " | ".join(_fmt(t[n]["state_bytes"], "B") if n in t else "-" for n in ctxs)
        lines.append(f"| {mixer} | {us} | {st} |")
    return lines + _contention_note([r for t in table.values() for r in t.values()]) + [""]


def compute_time(ok: list[dict]) -> str:
    """What the finished cases cost: the sum of their wall times (process-hours) and the time
    in which at least one of them ran (the union of their intervals, so a sweep's pauses and
    the gaps between its sessions are left out)."""
    spans = sorted((r["finished_at"] - r["wall_s"], r["finished_at"]) for r in ok
                   if r.get("wall_s") and r.get("finished_at"))
    busy, start, end = 0.0, None, None
    for s, e in spans:
        if end is None or s > end:
            busy += (end - start) if end is not None else 0.0
            start, end = s, e
        else:
            end = max(end, e)
    busy += (end - start) if end is not None else 0.0
    total = sum(r.get("wall_s") or 0.0 for r in ok)

    def span(s: float) -> str:
        return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.0f} min"
    return (f"Compute: {span(total)} of process time for the {len(ok)} finished cases, over "
            f"{span(busy)} in which at least one of them ran (the sum of their wall times, and "
            "the union of their intervals).")


def _where_section(ok: list[dict]) -> list[str]:
    """Where the cases ran, when not all on one host through one executor (a cluster sweep)."""
    places = Counter((str(r["env"].get("host", "?")), str((r.get("ran_on") or {}).get("executor", "local process")))
                     for r in ok)
    if len(places) < 2 and not any(r.get("ran_on") for r in ok):
        return []
    lines = ["Where the cases ran:", "", "| host | executor | cases |", "|---|---|---|"]
    lines += [f"| {cell(h)} | {cell(e)} | {n} |" for (h, e), n in sorted(places.items())]
    return lines + [""]


def _flop_count(result: dict | None) -> str:
    if result is None:
        return "-"
    return "not counted" if result.get("flops_forward") is None else _fmt(result["flops_forward"])


def _flop_rate(result: dict | None, passes: int) -> str:
    f = result.get("flops_forward") if result else None
    return "-" if f is None or not result.get("seconds") else f"{passes * f / result['seconds'] / 1e9:.1f}"


def _contended(result: dict) -> str:
    return " †" if result.get("contended") is True else ""


def _contention_note(results: list[dict]) -> list[str]:
    """The footnote for timings measured under contention, with how to redo them."""
    n = sum(1 for r in results if r.get("contended") is True)
    if not n:
        return []
    return ["", f"† {n} timing{'s' if n > 1 else ''} measured under contention: the case's process got less "
            "than 60 % of its threads' CPU time while timing (other load on the machine), so the number is "
            "too slow. Rerun them alone: `zoo bench SUITE --retry-failed` redoes flagged and failed cases."]


def _extrapolation_section(rows):
    x = _ok(rows, "extrapolation")
    if not x:
        return []
    tests = sorted({k for r in x for k in r["result"]["metrics"] if k.endswith("/accuracy")},
                   key=lambda k: int(k.split("@")[1].split("/")[0]) if "@" in k else 0)
    lines = [f"## Length extrapolation ({x[0]['case']['task']}, {x[0]['case']['mixer']}; test accuracy)", "",
             "| position | " + " | ".join(t.replace("/accuracy", "") for t in tests) + " |",
             "|---|" + "---|" * len(tests)]
    for r in sorted(x, key=lambda r: r["case"]["position"]):
        m = r["result"]["metrics"]
        cells = " | ".join(f"{m.get(t, float('nan')):.3f}" for t in tests)
        lines.append(f"| {r['case']['position']} | {cells} |")
    return lines + [""]


def compare(rows_a: list[dict], rows_b: list[dict], out_dir: Path, names: tuple[str, str]) -> Path:
    """B relative to A: time ratios of speed and decode cases, metric differences of quality cases."""
    (rows_a, skipped_a), (rows_b, skipped_b) = screen(rows_a), screen(rows_b)
    a = {r["key"]: r for r in rows_a if r.get("status") == "ok"}
    b = {r["key"]: r for r in rows_b if r.get("status") == "ok"}
    lines = [f"# Comparison: {names[1]} relative to {names[0]}", "",
             "| case | A | B | B / A |", "|---|---|---|---|"]
    for key in sorted(set(a) & set(b)):
        ra, rb = a[key]["result"], b[key]["result"]
        if "seconds" in ra:
            va, vb = ra["seconds"], rb["seconds"]
            lines.append(f"| {key} (s) | {va:.4g} | {vb:.4g} | {vb / va:.3f} |")
        elif "seconds_per_token" in ra:
            va, vb = ra["seconds_per_token"], rb["seconds_per_token"]
            lines.append(f"| {key} (s/token) | {va:.4g} | {vb:.4g} | {vb / va:.3f} |")
        elif "metrics" in ra:
            va, vb = ra["metrics"].get("test/accuracy", float("nan")), rb["metrics"].get("test/accuracy", float("nan"))
            lines.append(f"| {key} (accuracy) | {va:.4f} | {vb:.4f} | {vb - va:+.4f} (difference) |")
    only = sorted(set(a) ^ set(b))
    if only:
        lines += ["", "In one result set only: " + ", ".join(only)]
    for name, skipped in zip(names, (skipped_a, skipped_b), strict=True):
        if skipped:
            lines += ["", f"Rows of {name} it could not use: " + "; ".join(skipped)]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "compare.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def compare_runs(run_dirs: list[str], out_dir: Path) -> Path:
    """Two `zoo fit` runs side by side: their final metrics (B - A) and validation curves."""
    import json

    from zoo.train import read_metrics

    outs = [json.loads((Path(d) / "metrics.json").read_text()) for d in run_dirs]
    names = [Path(d).name for d in run_dirs]
    lines = [f"# Runs: {names[1]} against {names[0]}", "", f"| metric | {names[0]} | {names[1]} | B - A |",
             "|---|---|---|---|"]
    for key in sorted(set(outs[0].get("metrics", {})) | set(outs[1].get("metrics", {}))):
        a, b = (o.get("metrics", {}).get(key, math.nan) for o in outs)
        lines.append(f"| {key} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    for key in ("status", "steps", "train_seconds", "params"):
        lines.append(f"| {key} | {outs[0].get(key, '-')} | {outs[1].get(key, '-')} | |")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, d in zip(names, run_dirs, strict=True):
        rows = read_metrics(d)
        val = [(int(r["step"]), float(r["val/accuracy"])) for r in rows if r.get("val/accuracy")]
        if val:
            ax.plot([v[0] for v in val], [v[1] for v in val], marker="o", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("validation accuracy")
    ax.legend(fontsize=7)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_dir / "compare.png", dpi=110)
    plt.close(fig)
    path = out_dir / "compare.md"
    path.write_text("\n".join(lines + ["", "![validation accuracy](compare.png)", ""]))
    return path
