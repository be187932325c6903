"""The findings protocol on synthetic result rows: lr selection, seed aggregation, flags, ranks,
claim rules; and end to end on a tiny suite through the sweep with two jobs."""

import json
import math

import pytest

import zoo
from zoo import findings as fd


def row(setting, mixer, lr, seed, acc, *, phase=None, val=None, status="ok", chosen=None, metric="test/accuracy",
        stop_at=0.99, chance=0.1, task_args=None):
    phase = phase or ("tune" if chosen is None else "seed")
    case = {"kind": "findings", "setting": setting, "mixer": mixer, "phase": phase, "chance": chance,
            "task": "mqar", "task_args": task_args or {}, "model": {},
            "train": {"lr": lr if phase == "tune" else "best", "seed": seed, "stop_at": stop_at, "data_seed": 0}}
    r = {"key": f"findings/{setting}/{mixer}/{phase}/{lr}/{seed}", "case": case, "status": status}
    if status == "ok":
        r["result"] = {"metrics": {metric: acc}, "val_curve": val or [[100, acc], [200, acc]], "val_loss": 1 - acc}
    if phase == "seed":
        r["lr"] = chosen
    return r


def test_lr_is_chosen_on_validation_and_seeds_aggregate_with_a_t_interval():
    rows = [row("s", "m", 1e-3, 0, 0.50, val=[[100, 0.4], [200, 0.60]]),
            row("s", "m", 3e-3, 0, 0.90, val=[[100, 0.4], [200, 0.55]]),  # better on test, worse on val
            row("s", "m", 1e-3, 1, 0.70, chosen=1e-3), row("s", "m", 1e-3, 2, 0.60, chosen=1e-3),
            row("s", "m", 3e-3, 3, 0.99, chosen=3e-3)]  # a stale seed run made with another choice
    (s,) = fd.summarize(rows)
    assert s.lr == 1e-3 and s.values == [0.50, 0.70, 0.60] and s.stale == 1
    assert s.mean == pytest.approx(0.6) and s.std == pytest.approx(0.1)
    lo, hi = s.ci
    assert hi - s.mean == pytest.approx(4.303 * 0.1 / math.sqrt(3))  # t(0.975, 2 dof)
    assert s.grid == {1e-3: 0.60, 3e-3: 0.55}


def test_among_runs_that_reached_the_target_the_fewest_steps_choose():
    """A run stops at its first validation above the target, so final accuracies there are noise:
    the rate that got there first wins (ties: lower validation loss), as ALiBi's 1e-3 (step 1250)
    should have over 3e-3 (step 2500, 0.999 at the stop), whose other seeds never learned."""
    slow = row("s", "m", 3e-3, 0, 0.99, val=[[1250, 0.33], [2500, 0.999]])
    fast = row("s", "m", 1e-3, 0, 0.99, val=[[1000, 0.97], [1250, 0.997]])
    short = row("s", "m", 3e-4, 0, 0.95, val=[[1500, 0.90], [3000, 0.989]])
    assert fd.choose_lr([slow, fast, short]) == 1e-3
    assert fd.steps_to_target(fast) == 1250 and fd.steps_to_target(short) is None
    (s,) = fd.summarize([slow, fast, short])
    assert s.lr == 1e-3 and s.reached == {3e-3: 2500, 1e-3: 1250, 3e-4: None}  # the report shows "0.99 @2500"
    tie = row("s", "m", 3e-3, 0, 0.99, val=[[1000, 0.97], [1250, 0.991]])
    tie["result"]["val_loss"], fast["result"]["val_loss"] = 0.01, 0.02
    assert fd.choose_lr([fast, tie]) == 3e-3  # same step: lower validation loss
    # short of the target, or without one, the final validation accuracy still decides
    assert fd.choose_lr([short, row("s", "m", 1e-2, 0, 0.9, val=[[1500, 0.5], [3000, 0.97]])]) == 3e-4
    free = [row("s", "m", lr, 0, 0.9, val=v, stop_at=0.0) for lr, v in
            ((1e-3, [[250, 0.999], [500, 0.995]]), (3e-3, [[250, 0.5], [500, 0.999]]))]
    assert fd.choose_lr(free) == 3e-3


def test_flags_converged_still_improving_diverged_and_at_chance():
    conv = row("s", "a", 1e-3, 0, 0.99, val=[[100, 0.5], [200, 0.995]])
    rising = row("s", "b", 1e-3, 0, 0.40, val=[[100, 0.1], [200, 0.2], [300, 0.3], [400, 0.40]])
    flat = row("s", "c", 1e-3, 0, 0.40, val=[[100, 0.1], [200, 0.39], [300, 0.40], [400, 0.40]])
    assert fd.run_flags(conv, 0.99) == {"converged": True, "still_improving": False}
    assert fd.run_flags(rising, 0.99) == {"converged": False, "still_improving": True}
    assert fd.run_flags(flat, 0.99) == {"converged": False, "still_improving": False}
    assert fd.run_flags(row("s", "d", 1e-3, 0, 0, status="diverged"), 0.99) == {"diverged": True}
    chance = [row("s", "e", 1e-3, 0, 0.11), row("s", "e", 1e-3, 1, 0.10, chosen=1e-3),
              row("s", "e", 1e-3, 2, 0.105, chosen=1e-3), row("s", "e", 1e-2, 0, 0, status="diverged")]
    (s,) = fd.summarize(chance)
    assert s.at_chance and "AT CHANCE" in s.flag_text()
    above = [row("s", "f", 1e-3, k, 0.5 + 0.01 * k, chosen=None if k == 0 else 1e-3) for k in range(3)]
    assert not fd.summarize(above)[0].at_chance


def test_at_chance_and_at_floor_name_where_most_runs_sit_not_a_wide_interval():
    """Two standard errors of three unlike seeds span most of [0, 1]: the mean alone called a row
    of 0.967 / 0.223 / 0.990 'at the floor' and 0.46 / 0.061 / 0.061 'at chance'. A split row is
    SEEDS SPLIT, not at its floor; a row with two runs at the floor and none at chance is AT FLOOR."""
    p4, p16 = {"n_pairs": 4}, {"n_pairs": 16}
    flat = [[250, 0.2], [2000, 0.22], [3000, 0.22]]
    split = [row("w16", "ssm", 1e-2, k, a, chosen=None if k == 0 else 1e-2, chance=0.016, task_args=p4,
                 val=flat if a < 0.5 else [[250, 0.5], [3000, a]]) for k, a in enumerate([0.967, 0.223, 0.990])]
    (s,) = fd.summarize(split)
    assert s.split and not s.at_floor and not s.at_chance and "AT FLOOR" not in s.flag_text()
    floor = [row("p16", "win", 3e-3, k, a, chosen=None if k == 0 else 3e-3, chance=0.016, task_args=p16)
             for k, a in enumerate([0.46, 0.061, 0.061])]
    (f,) = fd.summarize(floor)
    assert not f.at_chance and f.at_floor and f.flag_text() == "AT FLOOR 0.062"
    one = [row("p16", "win", 3e-3, k, a, chosen=None if k == 0 else 3e-3, chance=0.016, task_args=p16)
           for k, a in enumerate([0.46, 0.061, 0.30])]  # one run at the floor of three: no flag
    assert fd.summarize(one)[0].flag_text() == "-"


def test_ranking_shares_ranks_when_intervals_overlap():
    rows = []
    for mixer, accs in (("a", [0.90, 0.91, 0.92]), ("b", [0.88, 0.93, 0.90]), ("c", [0.30, 0.31, 0.32])):
        rows += [row("s", mixer, 1e-3, k, acc, chosen=None if k == 0 else 1e-3) for k, acc in enumerate(accs)]
    ranks = {s.mixer: r for s, r in fd.ranking(fd.summarize(rows))}
    assert ranks == {"a": "1-2", "b": "1-2", "c": "3"}
    # overlap is not transitive (mqar-p4 of the full run): a wide mamba interval overlaps softmax,
    # which is apart from and above window; softmax can be first or second, never third
    rows = []
    for mixer, accs in (("softmax", [0.999, 0.998, 1.0]), ("window", [0.792, 0.791, 0.792]),
                        ("mamba", [0.57, 0.805, 0.953]), ("linear", [0.244, 0.253, 0.246])):
        rows += [row("s", mixer, 1e-3, k, acc, chosen=None if k == 0 else 1e-3) for k, acc in enumerate(accs)]
    ranks = {s.mixer: r for s, r in fd.ranking(fd.summarize(rows))}
    assert ranks == {"softmax": "1-2", "window": "2-3", "mamba": "1-3", "linear": "4"}


def claim(**rule):
    return fd.Claim("c", "a claim", "a paper", rule)


def three(setting, mixer, accs, improving=False, metric="test/accuracy", task_args=None):
    val = [[100, 0.1], [200, 0.5]] if improving else None
    return [row(setting, mixer, 1e-3, k, a, chosen=None if k == 0 else 1e-3, val=val, metric=metric,
                task_args=task_args) for k, a in enumerate(accs)]


def test_a_fall_from_the_floor_or_short_of_budget_is_no_verdict():
    """mqar's floor is a guess among the example's values (1 / n_pairs): a mixer that sits there
    at 4 pairs and at 16 'falls' from 0.25 to 0.06 without ever recalling, which is no evidence
    that recall degrades. And a drop that is too small while the easier setting's runs are still
    improving may only be a budget too small: inconclusive, not refuted."""
    p4, p16 = {"n_pairs": 4}, {"n_pairs": 16}
    rows = three("p4", "lin", [0.25, 0.24, 0.26], task_args=p4) + three("p16", "lin", [0.06, 0.06, 0.07], task_args=p16)
    rows += three("p4", "ssm", [0.9, 0.92, 0.91], task_args=p4) + three("p16", "ssm", [0.4, 0.45, 0.5], task_args=p16)
    rows += three("p4", "late", [0.57, 0.6, 0.55], improving=True, task_args=p4)
    rows += three("p16", "late", [0.95, 0.96, 0.95], task_args=p16)
    rows += three("p4", "flat", [0.97, 0.98, 0.97], task_args=p4) + three("p16", "flat", [0.95, 0.96, 0.95], task_args=p16)
    by = {(s.setting, s.mixer): s for s in fd.summarize(rows)}
    assert by["p4", "lin"].floor == 0.25 and "AT FLOOR 0.250" in by["p4", "lin"].flag_text()
    assert not by["p4", "ssm"].at_floor and "AT FLOOR" not in by["p16", "ssm"].flag_text()
    verdict, ours = fd.evaluate(claim(kind="decreases", mixers=["lin"], settings=["p4", "p16"], by=0.1), rows)
    assert verdict == fd.INCONCLUSIVE and "at its floor 0.250 already at p4: no evidence either way" in ours
    both = claim(kind="decreases", mixers=["lin", "ssm"], settings=["p4", "p16"], by=0.1)
    assert fd.evaluate(both, rows)[0] == fd.REPRODUCED  # the verdict is the mixer that learned p4
    assert fd.evaluate(claim(kind="decreases", mixers=["late"], settings=["p4", "p16"], by=0.1), rows)[0] == \
        fd.INCONCLUSIVE
    assert fd.evaluate(claim(kind="decreases", mixers=["flat"], settings=["p4", "p16"], by=0.1), rows)[0] == \
        fd.NOT_REPRODUCED


def test_claim_rules_reproduced_not_reproduced_inconclusive():
    rows = three("p4", "attn", [0.99, 0.98, 1.0]) + three("p16", "attn", [0.97, 0.96, 0.99])
    rows += three("p4", "ssm", [0.9, 0.92, 0.91]) + three("p16", "ssm", [0.4, 0.45, 0.5])
    rows += three("p4", "slow", [0.6, 0.62, 0.61], improving=True)
    at_least = claim(kind="at_least", mixer="attn", settings=["p4", "p16"], value=0.95)
    assert fd.evaluate(at_least, rows)[0] == fd.REPRODUCED
    assert fd.evaluate(claim(kind="at_least", mixer="ssm", settings=["p4", "p16"], value=0.95), rows)[0] == fd.NOT_REPRODUCED
    assert fd.evaluate(claim(kind="at_least", mixer="slow", settings=["p4"], value=0.95), rows)[0] == fd.INCONCLUSIVE
    verdict, ours = fd.evaluate(claim(kind="at_least", mixer="nope", settings=["p4"], value=0.95), rows)
    assert verdict == fd.INCONCLUSIVE and "no finished runs of nope" in ours
    # a missing setting does not hide a present one that contradicts the claim
    verdict, ours = fd.evaluate(claim(kind="at_least", mixer="ssm", settings=["p8", "p16"], value=0.95), rows)
    assert verdict == fd.NOT_REPRODUCED and "no finished runs of ssm @ p8" in ours
    assert fd.evaluate(claim(kind="decreases", mixers=["ssm"], settings=["p4", "p16"], by=0.1), rows)[0] == fd.REPRODUCED
    assert fd.evaluate(claim(kind="decreases", mixers=["attn"], settings=["p4", "p16"], by=0.1), rows)[0] == fd.NOT_REPRODUCED
    assert fd.evaluate(claim(kind="higher", mixer="attn", other="ssm", setting="p16", by=0.2), rows)[0] == fd.REPRODUCED
    assert fd.evaluate(claim(kind="higher", mixer="ssm", other="attn", setting="p16", by=0.2), rows)[0] == fd.NOT_REPRODUCED
    ext = three("ind", "attn", [0.2, 0.25, 0.3], metric="test@256/accuracy")
    assert fd.evaluate(claim(kind="at_most", mixer="attn", settings=["ind"], metric="test@256/accuracy", value=0.5),
                       ext)[0] == fd.REPRODUCED
    single = [row("p4", "one", 1e-3, 0, 0.99)]  # above the bar, but one run is no verdict
    assert fd.evaluate(claim(kind="at_least", mixer="one", settings=["p4"], value=0.95), single)[0] == fd.INCONCLUSIVE


def test_a_run_still_improving_decides_no_claim_it_could_still_change():
    """A run still rising can still cross a bar or close a gap: an at_most rule that holds, a
    decreases drop against a harder setting still improving and a higher gap whose trailing
    mixer still improves are inconclusive; what a rise cannot undo stands."""
    rows = three("p4", "ssm", [0.9, 0.92, 0.91]) + three("p16", "ssm", [0.4, 0.45, 0.5], improving=True)
    rows += three("p16", "attn", [0.97, 0.96, 0.99])
    rows += three("sel", "lti", [0.2, 0.25, 0.3], improving=True) + three("sel", "lti2", [0.7, 0.75, 0.8], improving=True)
    verdict, ours = fd.evaluate(claim(kind="decreases", mixers=["ssm"], settings=["p4", "p16"], by=0.1), rows)
    assert verdict == fd.INCONCLUSIVE and "still improving at p16" in ours
    verdict, ours = fd.evaluate(claim(kind="higher", mixer="attn", other="ssm", setting="p16", by=0.2), rows)
    assert verdict == fd.INCONCLUSIVE and "ssm @ p16: 0.450" in ours and "still improving 3/3" in ours
    assert fd.evaluate(claim(kind="higher", mixer="ssm", other="attn", setting="p16", by=0.2), rows)[0] == \
        fd.INCONCLUSIVE  # behind, but still rising
    assert fd.evaluate(claim(kind="at_most", mixer="lti", settings=["sel"], value=0.5), rows)[0] == fd.INCONCLUSIVE
    assert fd.evaluate(claim(kind="at_most", mixer="lti2", settings=["sel"], value=0.5), rows)[0] == \
        fd.NOT_REPRODUCED  # above the bar and rising: more budget cannot bring it under
    flat = three("p4", "ssm", [0.9, 0.92, 0.91]) + three("p16", "ssm", [0.4, 0.45, 0.5])
    assert fd.evaluate(claim(kind="decreases", mixers=["ssm"], settings=["p4", "p16"], by=0.1), flat)[0] == \
        fd.REPRODUCED


def test_seeds_split_at_the_chosen_rate_decide_no_claim_a_better_rate_could_change():
    """Softmax at width 32 with 16 pairs: two seeds reach 0.99 at 3e-3, one stalls at the floor
    (0.06). The rate does not carry across seeds, so a mean of 0.685 is no evidence that
    attention fails the task; a seed that ends just short of the target is no split."""
    split = [row("w32", "attn", 3e-3, k, a, chosen=None if k == 0 else 3e-3, val=v) for k, (a, v) in
             enumerate([(0.999, [[500, 0.5], [1000, 0.999]]), (0.061, [[1500, 0.06], [3000, 0.061]]),
                        (0.994, [[500, 0.6], [1000, 0.994]])])]
    (s,) = fd.summarize(split)
    assert s.split and s.stalled == 1 and "SEEDS SPLIT" in s.flag_text()
    verdict, ours = fd.evaluate(claim(kind="at_least", mixer="attn", settings=["w32"], value=0.95), split)
    assert verdict == fd.INCONCLUSIVE and "seeds split: 2 near the target, 1 stalled" in ours
    rows = split + three("w32", "ssm", [0.2, 0.25, 0.3])
    assert fd.evaluate(claim(kind="higher", mixer="ssm", other="attn", setting="w32", by=0.2), rows)[0] == \
        fd.INCONCLUSIVE  # behind a split mixer: a rate that carries could widen the gap, not close it
    near = [dict(r) for r in split]
    near[1] = row("w32", "attn", 3e-3, 1, 0.977, chosen=3e-3, val=[[1500, 0.97], [3000, 0.977]])
    (s,) = fd.summarize(near)
    assert not s.split and s.stalled == 0
    assert fd.evaluate(claim(kind="at_least", mixer="attn", settings=["w32"], value=0.95), near)[0] == fd.REPRODUCED
    # two seeds just short of the target and one at the floor (Mamba at width 32, 4 pairs) split too
    short = [row("w32", "ssm", 1e-2, k, a, chosen=None if k == 0 else 1e-2, val=[[1500, a], [3000, a]])
             for k, a in enumerate([0.974, 0.246, 0.984])]
    (s,) = fd.summarize(short)
    assert s.split and s.near == 2 and s.stalled == 1
    assert fd.longer_needed(short[1], 0.99, [short[0], short[2]]) is None
    assert fd.longer_needed(short[1], 0.99, []) is not None  # flat beside nothing that learned
    failed = [row("w32", "attn", 3e-3, k, 0.3, chosen=None if k == 0 else 3e-3, val=[[1500, 0.3], [3000, 0.3]])
              for k in range(3)]  # every seed stalls: the rate fails alike everywhere, no split
    (s,) = fd.summarize(failed)
    assert not s.split and s.stalled == 3
    assert fd.evaluate(claim(kind="at_least", mixer="attn", settings=["w32"], value=0.95), failed)[0] == \
        fd.NOT_REPRODUCED


def test_an_extrapolation_claim_counts_only_the_runs_that_learned_the_task(tmp_path):
    """Two ALiBi seeds that never learned induction at the training length (test@64 0.10 and 0.06
    in the reference run) are no evidence that ALiBi fails past it: with ``learned`` they are
    left out, and the report says so; either verdict then needs three runs that learned."""
    def ind(accs):  # (test@64, test@256) per seed
        rows = three("ind", "attn", [a for a, _ in accs])
        for r, (a64, a256) in zip(rows, accs, strict=True):
            r["result"]["metrics"] = {"test@64/accuracy": a64, "test@256/accuracy": a256}
        return rows

    rule = {"kind": "at_least", "mixer": "attn", "settings": ["ind"], "metric": "test@256/accuracy", "value": 0.5}
    split = ind([(0.997, 0.989), (0.10, 0.04), (0.06, 0.05)])
    verdict, ours = fd.evaluate(claim(**rule), split)  # the mean of all three, 0.36, from seeds split
    assert verdict == fd.INCONCLUSIVE and "seeds split: 1 near the target, 2 stalled" in ours
    verdict, ours = fd.evaluate(claim(**rule, learned=0.9), split)
    assert verdict == fd.INCONCLUSIVE and "attn @ ind: 0.989 (n=1)" in ours and "2 of 3 runs left out" in ours
    assert fd.evaluate(claim(**rule, learned=0.9), ind([(1.0, 0.98), (0.99, 0.97), (0.995, 0.99)]))[0] == fd.REPRODUCED
    verdict, ours = fd.evaluate(claim(**rule, learned=0.9), ind([(0.1, 0.04)] * 3))
    assert verdict == fd.INCONCLUSIVE and "no run learned the task" in ours
    # below the bar on two runs that learned: a verdict either way needs three
    two = ind([(1.0, 0.04), (0.99, 0.05), (0.06, 0.05)])
    assert fd.evaluate(claim(**rule, learned=0.9), two)[0] == fd.INCONCLUSIVE
    assert fd.evaluate(claim(**{**rule, "kind": "at_most"}, learned=0.9), two)[0] == fd.INCONCLUSIVE
    assert fd.evaluate(claim(**rule), ind([(1.0, 0.04), (0.99, 0.05)]))[0] == fd.INCONCLUSIVE
    p = tmp_path / "c.yaml"
    for bad in ("{kind: decreases, mixers: [a], settings: [x, y], learned: 0.9}", "{kind: at_least, mixer: a, "
                "settings: [x], value: 0.5, learned: 1.5}"):
        p.write_text(f"claims:\n  x: {{claim: c, source: s, rule: {bad}}}\n")
        with pytest.raises(zoo.ZooConfigError, match=r"'learned' .* is a number in \(0, 1\] on an at_least or at_most rule"):
            fd.load_claims(p)


def test_claims_file_is_checked(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("claims:\n  x: {claim: c, source: s, rule: {kind: bigger}}\n")
    with pytest.raises(zoo.ZooConfigError, match=r"unknown rule kind 'bigger'.*Allowed: at_least, at_most, decreases, higher"):
        fd.load_claims(p)
    from zoo.suite import SUITES_DIR

    assert len(fd.load_claims(SUITES_DIR / "claims.yaml")) >= 8


TINY = """
timeout: 600
findings:
  claims: claims.yaml
  mixers: [softmax, linear]
  lrs: [1.0e-3, 3.0e-3]
  seeds: [0, 1]
  model: {d_model: 32, n_layers: 1}
  train: {max_steps: 30, batch_size: 16, warmup_steps: 5, val_every: 15, stop_at: 0.99}
  settings:
    p1: {task: mqar, args: {vocab: 16, seq_len: 16, n_pairs: 1, train_size: 0, test_size: 32}}
"""


def test_a_findings_suite_runs_with_two_jobs_and_reports(tmp_path):
    from zoo.cli import main

    suite = tmp_path / "tiny.yaml"
    suite.write_text(TINY)
    assert main(["bench", str(suite), "--out", str(tmp_path / "out"), "--jobs", "2", "--no-progress"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    assert all(r["threads"] == 1 for r in rows)
    tune = {(r["case"]["mixer"], r["case"]["train"]["lr"]): r for r in rows if r["case"]["phase"] == "tune"}
    for r in rows:
        if r["case"]["phase"] == "seed":  # ran with the lr its tune runs chose, after them
            mixer = r["case"]["mixer"]
            assert r["lr"] == fd.choose_lr([t for (m, _), t in tune.items() if m == mixer])
            assert r["case"]["train"]["lr"] == "best"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Findings" in report and "| rank | mixer | lr | runs |" in report and "### Published claims" in report
    assert "inconclusive" in report  # two seeds and a tiny budget decide nothing
    # a rerun finds every case done
    assert main(["bench", str(suite), "--out", str(tmp_path / "out"), "--jobs", "2", "--no-progress"]) == 0
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 6


def test_a_settings_seed_cases_run_before_later_settings_tune_cases(tmp_path):
    """A sweep stopped part way must hold whole settings: once a setting's tune runs are done, its
    seed runs start before the next setting's tune runs (and never before their own)."""
    from zoo.suite import load_suite
    from zoo.sweep import run_suite

    p = tmp_path / "two.yaml"
    p.write_text(TINY.replace("mixers: [softmax, linear]", "mixers: [softmax]").replace(
        "    p1: {task: mqar,", "    p2: {task: mqar, args: {vocab: 16, seq_len: 16, n_pairs: 2, train_size: 0, test_size: 32}}\n"
        "    p1: {task: mqar,"))
    order = []

    def runner(case, timeout):  # the runs themselves do not matter here: a row per case, in order
        order.append(case["key"])
        return {"key": case["key"], "status": "ok", "wall_s": 0.0,
                "result": {"metrics": {"test/accuracy": 0.5}, "val_curve": [[15, case["train"]["lr"] * 100]]}}

    run_suite(load_suite(str(p)), tmp_path / "out", progress=False, jobs=1, runner=runner)
    settings = [k.split("/")[1] for k in order]
    phases = ["seed" if "/best/" in k else "tune" for k in order]
    assert len(order) == 6 and settings[:3] == [settings[0]] * 3, order  # one setting whole, then the other
    assert phases == ["tune", "tune", "seed"] * 2, order


def _scripted(order, val):
    """A runner whose final validation accuracy is ``val(mixer, lr)``, recording what ran."""
    def runner(case, timeout):
        order.append((case["key"], case["train"]["lr"]))
        acc = val(case["mixer"], case["train"]["lr"])
        return {"key": case["key"], "status": "ok", "wall_s": 0.0,
                "result": {"metrics": {"test/accuracy": acc}, "val_curve": [[15, acc], [30, acc]], "val_loss": 1 - acc}}
    return runner


def test_rates_beyond_the_grid_run_only_where_the_grid_chose_its_edge(tmp_path):
    """A rate chosen at the grid's edge is not tuned: the next rate beyond it runs (and the one
    after, while the choice stays at the edge); a choice inside the grid, or one that reached
    the target, skips them at no cost; the seed runs use the final choice."""
    from zoo.suite import cases, load_suite
    from zoo.sweep import run_suite

    p = tmp_path / "ext.yaml"
    p.write_text(TINY.replace("lrs: [1.0e-3, 3.0e-3]", "lrs: [1.0e-3, 3.0e-3]\n  extend_lrs: [1.0e-4, 1.0e-2, 3.0e-2]"))
    suite = load_suite(str(p))
    ext = [(c["key"].split("/")[2], c["train"]["lr"], c["extend"]) for c in cases(suite) if c["phase"] == "extend"]
    assert sorted(ext) == sorted((m, lr, k) for m in ("softmax", "linear")
                                 for lr, k in ((1e-4, 1), (1e-2, 1), (3e-2, 2)))
    # softmax: better the higher the rate, never at the target (0.99); linear: best inside the grid
    curve = {"softmax": {1e-4: 0.1, 1e-3: 0.2, 3e-3: 0.3, 1e-2: 0.5, 3e-2: 0.6},
             "linear": {1e-4: 0.9, 1e-3: 0.4, 3e-3: 0.3, 1e-2: 0.9, 3e-2: 0.9}}
    order = []
    run_suite(suite, tmp_path / "out", progress=False, jobs=2, runner=_scripted(order, lambda m, lr: curve[m][lr]))
    ran = sorted((k.split("/")[2], k.split("/")[3], lr) for k, lr in order)
    assert ran == sorted([("softmax", f"lr={lr:g}", lr) for lr in (1e-3, 3e-3, 1e-2, 3e-2)]
                         + [("linear", f"lr={lr:g}", lr) for lr in (1e-3, 3e-3, 1e-4)]
                         + [("softmax", "best", 3e-2), ("linear", "best", 1e-4)]), order
    # an extension waits for its grid and nearer extensions; a seed run for all of them
    for mixer in ("softmax", "linear"):
        keys = [k for k, _ in order if k.split("/")[2] == mixer]
        assert keys[-1].endswith("/best/seed=1") and all("/lr=" in k for k in keys[:-1]), keys
    assert [k for k, _ in order if k.startswith("findings/p1/softmax/lr=")][-2:] == [
        "findings/p1/softmax/lr=0.01/seed=0", "findings/p1/softmax/lr=0.03/seed=0"]
    rows = {r["key"]: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())}
    skipped = {k: r["reason"] for k, r in rows.items() if r["status"] == "skipped"}
    assert set(skipped) == {"findings/p1/softmax/lr=0.0001/seed=0", "findings/p1/linear/lr=0.01/seed=0",
                            "findings/p1/linear/lr=0.03/seed=0"}, skipped
    assert "chose 0.003, not their edge 0.001" in skipped["findings/p1/softmax/lr=0.0001/seed=0"]
    assert "chose 0.0001, not their edge 0.003" in skipped["findings/p1/linear/lr=0.03/seed=0"]
    s = {x.mixer: x for x in fd.summarize(list(rows.values()))}
    assert s["softmax"].lr == 3e-2 and s["softmax"].edge and "LR AT EDGE" in s["softmax"].flag_text()
    assert s["linear"].lr == 1e-4 and s["linear"].edge  # the lowest tried
    assert set(s["softmax"].grid) == {1e-3, 3e-3, 1e-2, 3e-2}
    from zoo.report import write_report

    text = write_report(list(rows.values()), tmp_path / "out").read_text()
    assert "extended by [0.0001, 0.01, 0.03]" in text and "3 more not needed" in text
    assert "Cases that did not finish" not in text


def test_a_choice_that_moves_reruns_its_seed_runs_and_one_that_stays_keeps_them(tmp_path):
    """Seed runs made with a rate the tuning no longer chooses (a rate beyond the grid won) are
    rerun with the new choice, not kept as stale rows; where the choice stayed, they stand."""
    from zoo.suite import load_suite
    from zoo.sweep import case_status, run_suite

    p = tmp_path / "ext.yaml"
    p.write_text(TINY)
    curve = {"softmax": {1e-3: 0.2, 3e-3: 0.3, 1e-2: 0.5}, "linear": {1e-3: 0.5, 3e-3: 0.3, 1e-2: 0.1}}
    first = []
    run_suite(load_suite(str(p)), tmp_path / "out", progress=False, jobs=1,
              runner=_scripted(first, lambda m, lr: curve[m][lr]))
    assert len(first) == 6
    p.write_text(TINY.replace("lrs: [1.0e-3, 3.0e-3]", "lrs: [1.0e-3, 3.0e-3]\n  extend_lrs: [1.0e-2]"))
    assert dict(case_status(load_suite(str(p)), tmp_path / "out"))["findings/p1/softmax/best/seed=1"] == (
        "ok (a rate beyond the grid may still change its lr)")
    second = []
    run_suite(load_suite(str(p)), tmp_path / "out", progress=False, jobs=1,
              runner=_scripted(second, lambda m, lr: curve[m][lr]))
    assert second == [("findings/p1/softmax/lr=0.01/seed=0", 1e-2), ("findings/p1/softmax/best/seed=1", 1e-2)]
    status = dict(case_status(load_suite(str(p)), tmp_path / "out"))
    assert status["findings/p1/linear/lr=0.01/seed=0"] == "skipped"
    assert status["findings/p1/linear/best/seed=1"] == status["findings/p1/softmax/best/seed=1"] == "ok"
    third = []  # everything is done
    run_suite(load_suite(str(p)), tmp_path / "out", progress=False, jobs=1,
              runner=_scripted(third, lambda m, lr: curve[m][lr]))
    assert third == []


def test_an_edge_tied_with_the_choice_is_extended_and_a_skip_is_judged_again(tmp_path):
    """Rates that all sit on one plateau (mqar's floor) choose among ties by noise: Mamba at width
    32 chose 1e-3 over 3e-3 at 0.25 both, and needs 1e-2. An edge within EDGE_TIE of the best,
    short of the target, is not shown worse, so its extension runs; a skip judged on other rows
    (or under an older rule) is judged again when the sweep resumes, and the seed runs follow."""
    from zoo.suite import load_suite
    from zoo.sweep import case_status, run_suite

    up = {"train": {"lr": 1e-2, "stop_at": 0.99}}
    tie = [row("s", "m", 1e-3, 0, 0.25), row("s", "m", 3e-3, 0, 0.245)]
    assert fd.extension_needed(up, tie) is None
    (s,) = fd.summarize(tie)
    assert s.lr == 1e-3 and s.edge  # chosen inside nothing: both rates are edges, tied
    apart = [row("s", "m", 1e-3, 0, 0.25), row("s", "m", 3e-3, 0, 0.2)]
    assert "not their edge 0.003 (0.050 lower on validation)" in fd.extension_needed(up, apart)
    p = tmp_path / "ext.yaml"
    p.write_text(TINY.replace("mixers: [softmax, linear]", "mixers: [softmax]").replace(
        "lrs: [1.0e-3, 3.0e-3]", "lrs: [1.0e-3, 3.0e-3]\n  extend_lrs: [1.0e-2]"))
    curve = {1e-3: 0.25, 3e-3: 0.1, 1e-2: 0.995}
    first = []
    run_suite(load_suite(str(p)), tmp_path / "out", progress=False, jobs=1,
              runner=_scripted(first, lambda m, lr: curve[lr]))
    assert [lr for _, lr in first] == [1e-3, 3e-3, 1e-3]  # 3e-3 far below: 1e-2 skipped, seed at 1e-3
    curve[3e-3] = 0.245  # the 3e-3 run again, now level with 1e-3: the skip no longer holds
    status = dict(case_status(load_suite(str(p)), tmp_path / "out"))
    assert status["findings/p1/softmax/lr=0.01/seed=0"] == "skipped"
    second = []
    run_suite(load_suite(str(p)), tmp_path / "out", progress=False, jobs=1, rerun="findings/p1/softmax/lr=0.003/*",
              runner=_scripted(second, lambda m, lr: curve[lr]))
    assert [k for k, _ in second] == ["findings/p1/softmax/lr=0.003/seed=0", "findings/p1/softmax/lr=0.01/seed=0",
                                      "findings/p1/softmax/best/seed=1"]
    assert second[-1][1] == 1e-2
    status = dict(case_status(load_suite(str(p)), tmp_path / "out"))
    assert set(status.values()) == {"ok"}, status
    # a skipped row that the rows on file now call for (an older rule wrote it): pending, then run
    results = tmp_path / "out" / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    ext = next(r for r in reversed(rows) if r["key"] == "findings/p1/softmax/lr=0.01/seed=0")
    results.write_text("".join(json.dumps(r) + "\n" for r in rows if r is not ext) + json.dumps(
        {"key": ext["key"], "case": ext["case"], "status": "skipped", "wall_s": 0.0,
         "reason": "the rates tried chose 0.001, not their edge 0.003", "finished_at": ext["finished_at"]}) + "\n")
    assert dict(case_status(load_suite(str(p)), tmp_path / "out"))["findings/p1/softmax/lr=0.01/seed=0"] == (
        "pending (skipped before; the rates tried now call for it)")
    third = []
    run_suite(load_suite(str(p)), tmp_path / "out", progress=False, jobs=1,
              runner=_scripted(third, lambda m, lr: curve[lr]))
    assert [k for k, _ in third] == ["findings/p1/softmax/lr=0.01/seed=0"]  # the seed run at 1e-2 stands


def test_a_case_that_needs_no_run_does_not_hold_a_slot(tmp_path):
    """With two jobs, a skipped extension must not leave its slot idle until the other case
    ends: the next ready case starts at once (here the second linear run, which the first
    waits for)."""
    import threading

    from zoo.suite import load_suite
    from zoo.sweep import run_suite

    p = tmp_path / "ext.yaml"
    p.write_text(TINY.replace("lrs: [1.0e-3, 3.0e-3]", "lrs: [1.0e-3, 3.0e-3]\n  extend_lrs: [1.0e-2]"))
    second, waited = threading.Event(), []

    def runner(case, timeout):
        if case["key"] == "findings/p1/linear/lr=0.001/seed=0":
            waited.append(second.wait(20))
        if case["key"] == "findings/p1/linear/lr=0.003/seed=0":
            second.set()
        acc = 0.995 if case["mixer"] == "softmax" else 0.5  # softmax converges: no extension
        return {"key": case["key"], "status": "ok", "wall_s": 0.0,
                "result": {"metrics": {"test/accuracy": acc}, "val_curve": [[30, acc]], "val_loss": 1 - acc}}

    run_suite(load_suite(str(p)), tmp_path / "out", progress=False, jobs=2, runner=runner)
    assert waited == [True]


def test_an_extension_not_needed_is_settled_before_runs_that_come_first(tmp_path):
    """A skipped extension unblocks its setting's seed runs: it is settled as soon as its tuning
    is done, not when its place in the queue comes (after every other extension's run)."""
    from zoo.suite import load_suite
    from zoo.sweep import run_suite

    p = tmp_path / "ext.yaml"
    p.write_text(TINY)
    # softmax rises with the rate (its extension runs); linear converges (its extension is skipped)
    curve = {"softmax": {1e-3: 0.2, 3e-3: 0.3, 1e-2: 0.5}, "linear": {1e-3: 0.995, 3e-3: 0.5, 1e-2: 0.5}}
    run_suite(load_suite(str(p)), tmp_path / "out", progress=False, jobs=1, runner=_scripted([], lambda m, lr: curve[m][lr]))
    # then both extensions are ready at once, softmax's first in the queue, and a third seed waits
    p.write_text(TINY.replace("lrs: [1.0e-3, 3.0e-3]", "lrs: [1.0e-3, 3.0e-3]\n  extend_lrs: [1.0e-2]").replace(
        "seeds: [0, 1]", "seeds: [0, 1, 2]"))
    order = []
    run_suite(load_suite(str(p)), tmp_path / "out", progress=False, jobs=1,
              runner=_scripted(order, lambda m, lr: curve[m][lr]))
    assert [k for k, _ in order] == ["findings/p1/linear/best/seed=2", "findings/p1/softmax/lr=0.01/seed=0",
                                     "findings/p1/softmax/best/seed=1", "findings/p1/softmax/best/seed=2"], order


def test_shards_hold_a_findings_mixer_and_setting_whole(tmp_path):
    """Two shards into one folder: each runs whole mixers (tune, extension, seeds), so no seed
    run chooses its rate, and no extension decides, from tuning another shard has not finished."""
    from zoo.suite import load_suite
    from zoo.sweep import collect, run_suite

    p = tmp_path / "ext.yaml"
    p.write_text(TINY.replace("lrs: [1.0e-3, 3.0e-3]", "lrs: [1.0e-3, 3.0e-3]\n  extend_lrs: [1.0e-2]"))
    curve = {"softmax": {1e-3: 0.2, 3e-3: 0.3, 1e-2: 0.5}, "linear": {1e-3: 0.5, 3e-3: 0.3, 1e-2: 0.1}}
    ran = {}
    for shard in ("0/2", "1/2"):
        ran[shard] = []
        run_suite(load_suite(str(p)), tmp_path / "out", shard=shard, progress=False, jobs=1,
                  runner=_scripted(ran[shard], lambda m, lr: curve[m][lr]))
    assert {k.split("/")[2] for k, _ in ran["0/2"]} == {"softmax"}
    assert {k.split("/")[2] for k, _ in ran["1/2"]} == {"linear"}
    rows = {r["key"]: r for r in collect([tmp_path / "out"])}
    assert rows["findings/p1/softmax/best/seed=1"]["lr"] == 1e-2 and rows["findings/p1/linear/best/seed=1"]["lr"] == 1e-3


def test_runs_still_improving_run_again_with_the_longer_budget(tmp_path):
    """A run of the chosen rate that ends its budget still improving is run again, fresh, with
    findings.extend_steps and counts in its place; one that converged or had flattened is not
    (its row reads skipped, with why); the longer runs wait for their setting's seed runs; a
    resumed sweep finds everything done."""
    from zoo.suite import cases, load_suite
    from zoo.sweep import case_status, run_suite

    p = tmp_path / "longer.yaml"
    p.write_text(TINY.replace("seeds: [0, 1]", "seeds: [0, 1, 2]\n  extend_steps: 90"))
    suite = load_suite(str(p))
    longer = [c for c in cases(suite) if c["phase"] == "longer"]
    assert len(longer) == 6 and {c["train"]["max_steps"] for c in longer} == {90}
    assert all(c["train"]["lr"] == "best" for c in longer)
    order = []

    timeouts = {}

    def runner(case, timeout):  # softmax seed 1 still rises at 30 steps; with 90 it converges
        order.append((case["key"], case["train"]["lr"], case["train"]["max_steps"]))
        timeouts[case["key"]] = timeout
        m, seed, steps = case["mixer"], case["train"]["seed"], case["train"]["max_steps"]
        acc = 0.995 if m == "softmax" and seed == 0 else 0.5 if m == "linear" else 0.9
        curve = [[15, acc], [30, acc]]
        if m == "softmax" and seed == 1:
            curve = [[30, 0.8], [60, 0.9], [90, 0.995]] if steps == 90 else [[15, 0.4], [30, 0.6]]
        if m == "linear" and case["train"]["lr"] == 1e-3:
            curve = [[15, 0.55], [30, 0.55]]
        return {"key": case["key"], "status": "ok", "wall_s": 0.0,
                "result": {"metrics": {"test/accuracy": curve[-1][1]}, "val_curve": curve, "val_loss": 0.1}}

    run_suite(suite, tmp_path / "out", progress=False, jobs=2, runner=runner)
    ran_longer = [x for x in order if "/longer/" in x[0]]
    assert ran_longer == [("findings/p1/softmax/longer/seed=1", 1e-3, 90)], order
    # the suite's timeout is for 30 steps: the 90-step run gets three times as long
    assert timeouts["findings/p1/softmax/longer/seed=1"] == 1800 and timeouts["findings/p1/softmax/best/seed=1"] == 600
    softmax = [k for k, _, _ in order if "/softmax/" in k]
    assert softmax[-1] == "findings/p1/softmax/longer/seed=1" and "findings/p1/softmax/best/seed=2" in softmax[:-1]
    rows = {r["key"]: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())}
    skipped = {k: r["reason"] for k, r in rows.items() if r["status"] == "skipped"}
    assert set(skipped) == {f"findings/p1/{m}/longer/seed={s}" for m in ("softmax", "linear") for s in (0, 1, 2)} - {
        "findings/p1/softmax/longer/seed=1"}
    assert "reached the validation target (0.995 at step 30)" in skipped["findings/p1/softmax/longer/seed=0"]
    assert "had stopped improving (0.550 at step 30)" in skipped["findings/p1/linear/longer/seed=0"]
    by = {x.mixer: x for x in fd.summarize(list(rows.values()))}
    assert by["softmax"].values == [0.995, 0.995, 0.9] and by["softmax"].flags["longer_budget"] == 1
    assert "still_improving" not in by["softmax"].flag_text() and "longer_budget 1/3" in by["softmax"].flag_text()
    assert by["linear"].values == [0.55, 0.55, 0.55] and "longer_budget" not in by["linear"].flag_text()
    status = dict(case_status(suite, tmp_path / "out"))
    assert status["findings/p1/softmax/longer/seed=1"] == "ok"
    assert status["findings/p1/softmax/longer/seed=0"] == "skipped"
    from zoo.report import write_report

    text = write_report(list(rows.values()), tmp_path / "out").read_text()
    assert "run again with 90 steps" in text and "(1 so far)" in text
    assert "5 more not needed: 5 longer budgets where the run had converged or stopped improving" in text
    again = []
    run_suite(suite, tmp_path / "out", progress=False, jobs=2, runner=_scripted(again, lambda m, lr: 0.5))
    assert again == []


def test_a_seed_stalled_beside_one_near_the_target_gets_the_longer_budget(tmp_path):
    """Recall sits on a plateau and then jumps: softmax at width 32 with 16 pairs reached 0.99 on
    two seeds and sat flat at the floor on the third. That seed is not "still improving", yet
    it is the one a longer budget can settle (here it jumps at step 90), and the row a sweep
    skipped before the rule is reopened on resume; a seed flat beside none near the target is not."""
    from zoo.suite import load_suite
    from zoo.sweep import case_status, run_suite

    p = tmp_path / "split.yaml"
    p.write_text(TINY.replace("seeds: [0, 1]", "seeds: [0, 1, 2]\n  extend_steps: 90"))
    suite = load_suite(str(p))
    order = []

    def runner(case, timeout):
        order.append(case["key"])
        m, seed, steps = case["mixer"], case["train"]["seed"], case["train"]["max_steps"]
        curve = [[15, 0.5], [30, 0.995]] if m == "softmax" else [[15, 0.3], [30, 0.3]]  # linear: flat everywhere
        if m == "softmax" and seed == 1:
            curve = [[30, 0.06], [60, 0.06], [90, 0.995]] if steps == 90 else [[15, 0.06], [30, 0.06]]
        return {"key": case["key"], "status": "ok", "wall_s": 0.0,
                "result": {"metrics": {"test/accuracy": curve[-1][1]}, "val_curve": curve, "val_loss": 0.1}}

    out = tmp_path / "out"
    run_suite(suite, out, progress=False, jobs=2, runner=runner)
    assert [k for k in order if "/longer/" in k] == ["findings/p1/softmax/longer/seed=1"]
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    by = {x.mixer: x for x in fd.summarize(rows)}
    assert by["softmax"].values == [0.995, 0.995, 0.995] and not by["softmax"].split
    assert by["linear"].stalled == 3 and not by["linear"].split
    # a sweep before the rule wrote that longer budget as skipped: a resume reopens and runs it
    lines = [json.dumps({**r, "status": "skipped", "reason": "had stopped improving", "result": None})
             if r["key"] == "findings/p1/softmax/longer/seed=1" else json.dumps(r) for r in rows]
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    status = dict(case_status(suite, out))
    assert status["findings/p1/softmax/longer/seed=1"] == "pending (skipped before; another seed's run now calls for it)"
    assert status["findings/p1/softmax/longer/seed=0"] == "skipped" and status["findings/p1/linear/longer/seed=1"] == "skipped"
    order.clear()
    run_suite(suite, out, progress=False, jobs=2, runner=runner)
    assert order == ["findings/p1/softmax/longer/seed=1"]
    assert dict(case_status(suite, out))["findings/p1/softmax/longer/seed=1"] == "ok"


def test_a_longer_budget_follows_the_choice_of_rate(tmp_path):
    """When a rate beyond the grid moves the choice, a longer run made with the old rate no longer
    counts: it is decided again from the new rate's run of its seed."""
    from zoo.suite import load_suite
    from zoo.sweep import case_status, run_suite

    p = tmp_path / "longer.yaml"
    body = TINY.replace("mixers: [softmax, linear]", "mixers: [softmax]").replace("seeds: [0, 1]", "seeds: [0]\n  extend_steps: 90")

    def rising(order):  # every rate still rising at 30 steps, the higher the better; converges at 90
        def runner(case, timeout):
            lr, steps = case["train"]["lr"], case["train"]["max_steps"]
            order.append((case["key"], lr))
            curve = [[90, 0.995]] if steps == 90 else [[15, lr * 50], [30, lr * 100]]
            return {"key": case["key"], "status": "ok", "wall_s": 0.0,
                    "result": {"metrics": {"test/accuracy": curve[-1][1]}, "val_curve": curve, "val_loss": 0.1}}
        return runner

    p.write_text(body)
    first = []
    run_suite(load_suite(str(p)), tmp_path / "out", progress=False, jobs=1, runner=rising(first))
    assert first[-1] == ("findings/p1/softmax/longer/seed=0", 3e-3)
    p.write_text(body.replace("lrs: [1.0e-3, 3.0e-3]", "lrs: [1.0e-3, 3.0e-3]\n  extend_lrs: [6.0e-3]"))
    assert dict(case_status(load_suite(str(p)), tmp_path / "out"))["findings/p1/softmax/longer/seed=0"] == (
        "ok (a rate beyond the grid may still change its lr)")
    second = []
    run_suite(load_suite(str(p)), tmp_path / "out", progress=False, jobs=1, runner=rising(second))
    assert second == [("findings/p1/softmax/lr=0.006/seed=0", 6e-3), ("findings/p1/softmax/longer/seed=0", 6e-3)]
    (s,) = fd.summarize([json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()])
    assert s.lr == 6e-3 and s.values == [0.995] and s.flags["longer_budget"] == 1


def test_a_weight_decay_grid_chooses_the_pair_and_extends_at_its_weight_decay(tmp_path):
    """findings.weight_decays crosses the rate grid (MAD's lr x weight decay): the best pair by
    validation is the choice, the seed runs take both, the row records both; a rate beyond the
    grid runs only at the chosen weight decay, and only where that weight decay's rates chose
    their edge."""
    from zoo.suite import cases, load_suite
    from zoo.sweep import case_status, run_suite

    p = tmp_path / "wd.yaml"
    p.write_text(TINY.replace("lrs: [1.0e-3, 3.0e-3]", "lrs: [1.0e-3, 3.0e-3]\n  weight_decays: [0.0, 0.1]\n"
                              "  extend_lrs: [1.0e-2]"))
    suite = load_suite(str(p))
    tune = {c["key"] for c in cases(suite) if c["phase"] == "tune" and c["mixer"] == "softmax"}
    assert tune == {f"findings/p1/softmax/lr={lr},wd={wd}/seed=0" for lr in ("0.001", "0.003") for wd in ("0", "0.1")}
    # softmax: best at 3e-3 with wd 0.1, the grid's upper edge: 1e-2 runs at wd 0.1, not at wd 0
    # (where it would have won); linear: best at 1e-3 with wd 0, not the upper edge: 1e-2 is skipped
    val = {("softmax", 1e-3, 0.0): 0.2, ("softmax", 3e-3, 0.0): 0.3, ("softmax", 1e-3, 0.1): 0.25,
           ("softmax", 3e-3, 0.1): 0.5, ("softmax", 1e-2, 0.1): 0.6, ("softmax", 1e-2, 0.0): 0.9,
           ("linear", 1e-3, 0.0): 0.7, ("linear", 3e-3, 0.0): 0.4, ("linear", 1e-3, 0.1): 0.6,
           ("linear", 3e-3, 0.1): 0.3, ("linear", 1e-2, 0.0): 0.1, ("linear", 1e-2, 0.1): 0.1}
    order = []

    def runner(case, timeout):
        t = case["train"]
        order.append((case["key"], t["lr"], t["weight_decay"]))
        acc = val[case["mixer"], t["lr"], t["weight_decay"]]
        return {"key": case["key"], "status": "ok", "wall_s": 0.0,
                "result": {"metrics": {"test/accuracy": acc}, "val_curve": [[15, acc], [30, acc]], "val_loss": 1 - acc}}

    run_suite(suite, tmp_path / "out", progress=False, jobs=2, runner=runner)
    ran = {k: (lr, wd) for k, lr, wd in order}
    assert "findings/p1/softmax/lr=0.01,wd=0.1/seed=0" in ran and "findings/p1/softmax/lr=0.01,wd=0/seed=0" not in ran
    assert ran["findings/p1/softmax/best/seed=1"] == (1e-2, 0.1) and ran["findings/p1/linear/best/seed=1"] == (1e-3, 0.0)
    rows = {r["key"]: r for r in map(json.loads, (tmp_path / "out" / "results.jsonl").read_text().splitlines())}
    assert "not this case's 0" in rows["findings/p1/softmax/lr=0.01,wd=0/seed=0"]["reason"]
    assert rows["findings/p1/softmax/best/seed=1"]["weight_decay"] == 0.1
    by = {x.mixer: x for x in fd.summarize(list(rows.values()))}
    assert (by["softmax"].lr, by["softmax"].weight_decay) == (1e-2, 0.1) and by["softmax"].values == [0.6, 0.6]
    assert by["softmax"].grid[(3e-3, 0.0)] == 0.3 and len(by["softmax"].grid) == 5
    assert (by["linear"].lr, by["linear"].weight_decay) == (1e-3, 0.0)
    assert all(v == "ok" or v == "skipped" for v in dict(case_status(suite, tmp_path / "out")).values())
    from zoo.report import write_report

    text = write_report(list(rows.values()), tmp_path / "out").read_text()
    assert "crossed with weight decays [0.0, 0.1]" in text and "| softmax | 0.01, wd 0.1 | 2 |" in text
    again = []
    run_suite(suite, tmp_path / "out", progress=False, jobs=2, runner=_scripted(again, lambda m, lr: 0.5))
    assert again == []
    p.write_text(TINY.replace("lrs: [1.0e-3, 3.0e-3]", "lrs: [1.0e-3, 3.0e-3]\n  weight_decays: [0.1]").replace(
        "train: {max_steps: 30,", "train: {weight_decay: 0.0, max_steps: 30,"))
    with pytest.raises(zoo.ZooConfigError, match=r"findings sets train.weight_decay itself"):
        load_suite(str(p))


def test_extension_rule_and_intervals_within_the_metric_range():
    grid = [row("s", "m", 1e-3, 0, 0.5), row("s", "m", 3e-3, 0, 0.7)]
    up = {"train": {"lr": 1e-2, "stop_at": 0.99}}
    down = {"train": {"lr": 1e-4, "stop_at": 0.99}}
    assert fd.extension_needed(up, grid) is None
    assert "not their edge 0.001" in fd.extension_needed(down, grid)
    conv = [row("s", "m", 1e-3, 0, 0.5), row("s", "m", 3e-3, 0, 0.995)]
    assert "reached the validation target" in fd.extension_needed(up, conv)
    assert fd.extension_needed(up, []) == "no finished tune run to extend"
    assert "inside" in fd.extension_needed({"train": {"lr": 2e-3}}, grid)
    (s,) = fd.summarize(conv)
    assert not s.edge  # at the edge, but it reached the target: nothing more to tune
    # three split seeds: the t interval would reach [-0.49, 1.86]; an accuracy stays in [0, 1]
    split = [row("s", "m", 1e-3, 0, 0.96), row("s", "m", 1e-3, 1, 0.14, chosen=1e-3),
             row("s", "m", 1e-3, 2, 0.96, chosen=1e-3)]
    (s,) = fd.summarize(split)
    assert s.ci == (0.0, 1.0)
    (s,) = fd.summarize([{**r, "result": {**r["result"], "metrics": {"test/loss": r["result"]["metrics"]["test/accuracy"]}}}
                         for r in split], metric="test/loss")
    assert s.ci[0] < 0 and s.ci[1] > 1  # a loss has no such range


@pytest.mark.parametrize("name", ["findings", "zoology"])
def test_every_claim_names_settings_and_mixers_its_suite_runs(name):
    """A claim whose setting or mixer the suite does not run can only read inconclusive: a typo
    in a claims file would hide a verdict for good."""
    from zoo.suite import SUITES_DIR, builtin_suites, cases, load_suite

    assert name in builtin_suites() and not any(n.startswith("claims") for n in builtin_suites())
    suite = load_suite(name)
    ran = {(c["setting"], c["mixer"]) for c in cases(suite)}
    claims = fd.load_claims(SUITES_DIR / suite.findings.claims)
    assert claims
    for claim in claims:
        rule = claim.rule
        settings = rule.get("settings") or [rule["setting"]]
        mixers = rule.get("mixers") or [rule["mixer"]] + ([rule["other"]] if "other" in rule else [])
        for setting in settings:
            for mixer in mixers:
                assert (setting, mixer) in ran, f"{claim.name}: {mixer} @ {setting} is not in suite {name}"


def test_the_zoology_grid_is_the_figure():
    """Zoology's Fig. 2: four (length, pairs) settings at three widths, its lr grid, one width
    panel per length in the plot."""
    from zoo.report import findings_panels
    from zoo.suite import cases, load_suite

    cs = cases(load_suite("zoology"))
    assert len(cs) == 12 * 4 * (4 + 2)  # settings x mixers x (rates + seed runs)
    lengths = {(c["task_args"]["seq_len"], c["task_args"]["n_pairs"]) for c in cs}
    assert lengths == {(64, 4), (128, 8), (256, 16), (512, 64)}
    assert {c["model"]["d_model"] for c in cs} == {64, 128, 256}
    assert all(c["task_args"]["vocab"] == 8192 for c in cs)
    assert sorted({c["train"]["lr"] for c in cs if c["phase"] == "tune"}) == pytest.approx(
        [1e-4, 4.6416e-4, 2.1544e-3, 1e-2], rel=1e-4)
    tasks = {c["setting"]: (c["task"], c["task_args"], c["model"]) for c in cs}
    summaries = [fd.Summary(setting=st, mixer="m", lr=1e-3, values=[0.5], chance=0.0) for st in tasks]
    panels = findings_panels(summaries, tasks)
    assert [(x, len(ss)) for _, x, ss, _ in panels] == [("model.d_model", 3)] * 4


def test_the_mad_grid_is_mads():
    """MAD's benchmark: six tasks, each a baseline and one difficulty axis changed at a time (66
    settings), lr {1e-4, 5e-4, 1e-3} x weight decay {0, 0.1}, 200 epochs of batch 128."""
    from zoo.suite import cases, load_suite

    cs = cases(load_suite("mad"))
    settings = {c["setting"]: (c["task"], c["task_args"], c["train"]) for c in cs}
    assert len(settings) == 66 and len(cs) == 66 * 6 * 6  # settings x mixers x (lr x wd), one seed
    assert {(c["train"]["lr"], c["train"]["weight_decay"]) for c in cs} == {
        (lr, wd) for lr in (1e-4, 5e-4, 1e-3) for wd in (0.0, 0.1)}
    per_task = {}
    for name, (_task, args, train) in settings.items():
        assert train["max_steps"] == 200 * -(-args["train_size"] // 128) and train["batch_size"] == 128
        per_task.setdefault(name.split("-")[0], []).append((name, args))
    assert {t: len(v) for t, v in per_task.items()} == {"recall": 11, "noisy": 14, "fuzzy": 11, "selcopy": 13,
                                                        "compress": 11, "memorize": 6}
    for t, named in per_task.items():  # every other setting changes one argument of the baseline
        base = dict(named)[t]
        for name, args in named:
            assert sum(args[k] != base[k] for k in base) == (0 if name == t else 1), name
    assert all(c.get("score_by_task") for c in cs)
    groups = {c["setting"]: c.get("group", c["task"]) for c in cs}  # recall and noisy recall: two MAD tasks
    assert sorted(set(groups.values())) == ["compression", "fuzzy_recall", "in_context_recall", "memorization",
                                            "noisy_recall", "selective_copy"]
    assert len(cases(load_suite("mad", quick=True))) == 6 * 2


def test_a_score_per_task_is_the_mean_over_its_settings(tmp_path):
    """findings.score_by_task: the report gives each mixer's mean over a task's settings (MAD's
    score), and says how many settings a partial mean has."""
    from zoo.report import write_report
    from zoo.suite import load_suite
    from zoo.sweep import run_suite

    p = tmp_path / "scores.yaml"
    p.write_text(TINY.replace("  claims: claims.yaml\n", "  score_by_task: true\n").replace("seeds: [0, 1]", "seeds: [0]").replace(
        "    p1: {task: mqar,", "    p2: {task: mqar, args: {vocab: 16, seq_len: 16, n_pairs: 2, train_size: 0, test_size: 32}}\n"
        "    c1: {task: compression, group: squeeze, args: {vocab: 6, seq_len: 8, train_size: 0, test_size: 32}}\n"
        "    p1: {task: mqar,"))
    acc = {("p1", "softmax"): 0.9, ("p2", "softmax"): 0.7, ("c1", "softmax"): 0.4, ("p1", "linear"): 0.5,
           ("p2", "linear"): 0.3}

    def runner(case, timeout):
        if (case["setting"], case["mixer"]) not in acc:
            return {"key": case["key"], "status": "error", "error": "left out", "wall_s": 0.0}
        a = acc[case["setting"], case["mixer"]]
        return {"key": case["key"], "status": "ok", "wall_s": 0.0,
                "result": {"metrics": {"test/accuracy": a}, "val_curve": [[30, a]], "val_loss": 1 - a}}

    out = run_suite(load_suite(str(p)), tmp_path / "out", progress=False, jobs=1, runner=runner)
    text = write_report([json.loads(x) for x in out.read_text().splitlines()], tmp_path / "out").read_text()
    assert "### Score per task" in text and "| mixer | mqar | squeeze | mean over tasks |" in text  # c1's group
    assert "| softmax | 0.800 | 0.400 | 0.600 |" in text and "| linear | 0.400 | - | - |" in text


def test_findings_suite_errors(tmp_path):
    from zoo.suite import cases, load_suite

    p = tmp_path / "s.yaml"
    p.write_text(TINY.replace("train: {max_steps: 30,", "train: {lr: 0.1, max_steps: 30,"))
    with pytest.raises(zoo.ZooConfigError, match=r"findings sets train.lr itself"):
        load_suite(str(p))
    p.write_text(TINY.replace("lrs: [1.0e-3, 3.0e-3]", "lrs: []"))
    with pytest.raises(zoo.ZooConfigError, match=r"findings needs settings, lrs and seeds"):
        load_suite(str(p))
    p.write_text(TINY.replace("lrs: [1.0e-3, 3.0e-3]", "lrs: [1.0e-3, 3.0e-3]\n  extend_lrs: [2.0e-3]"))
    with pytest.raises(zoo.ZooConfigError, match=r"extend_lrs must be distinct rates > 0 outside the grid \[0.001, 0.003\]"):
        load_suite(str(p))
    p.write_text(TINY.replace("lrs: [1.0e-3, 3.0e-3]", "lrs: [1.0e-3, 3.0e-3]\n  extend_steps: 30"))
    with pytest.raises(zoo.ZooConfigError, match=r"extend_steps \(30\) must exceed every setting's train.max_steps"):
        load_suite(str(p))
    assert len(cases(load_suite("findings"))) > 0


def test_report_of_a_partial_run_says_no_seed_runs_finished():
    """A findings run stopped after its tuning runs (the resumable full suite, committed part
    way) must not read as if it had a seed list: the report says none finished."""
    from zoo.report import _findings_section

    tune_only = [row("s", "m", lr, 0, 0.5) for lr in (1e-3, 3e-3)]
    text = "\n".join(_findings_section(tune_only, None))
    assert "rerun on init seeds (none in these results" in text
    both = tune_only + [row("s", "m", 1e-3, 1, 0.6, chosen=1e-3)]
    assert "rerun on init seeds [1]" in "\n".join(_findings_section(both, None))


def test_plot_panels_join_only_settings_that_differ_in_their_axis(tmp_path):
    """The difficulty plot draws a line only through settings that differ in its x axis: a setting
    with another query distribution is not a point of the pairs line, a width x length grid gets
    one width panel per length (Zoology's Fig. 2), and settings that differ in two things at once
    (or only in a non-numeric one, such as the positional scheme) draw no line at all."""
    from zoo.report import _findings_plots, findings_panels

    def s(setting, mixer="m", acc=0.5):
        return fd.Summary(setting=setting, mixer=mixer, lr=1e-3, values=[acc, acc + 0.01, acc - 0.01], chance=0.1,
                          state_bytes=1024)

    tasks = {"p4": ("mqar", {"n_pairs": 4, "seq_len": 64}, {"d_model": 128}),
             "p8": ("mqar", {"n_pairs": 8, "seq_len": 64}, {"d_model": 128}),
             "p16": ("mqar", {"n_pairs": 16, "seq_len": 64}, {"d_model": 128}),
             "p4u": ("mqar", {"n_pairs": 4, "seq_len": 64, "power_a": 1.0}, {"d_model": 128}),
             "sc": ("selective_copy", {"seq_len": 64, "n_tokens": 8}, {"d_model": 128}),
             "sc-long": ("selective_copy", {"seq_len": 256, "n_tokens": 16}, {"d_model": 128}),
             "ind-rope": ("induction", {"seq_len": 64}, {"d_model": 128, "position": "rope"}),
             "ind-alibi": ("induction", {"seq_len": 64}, {"d_model": 128, "position": "alibi"})}
    summaries = [s(st) for st in tasks] + [s("p4u", "w", 0.3)]
    ((title, x, ss, _),) = findings_panels(summaries, tasks)
    assert (title, x, sorted(s_.setting for s_ in ss)) == ("mqar", "n_pairs", ["p16", "p4", "p8"])

    grid = {f"d{d}-l{n}": ("mqar", {"n_pairs": n // 16, "seq_len": n}, {"d_model": d})
            for d in (64, 128, 256) for n in (64, 256)}
    panels = findings_panels([s(st) for st in grid], grid)
    assert [(t, x, len(ss)) for t, x, ss, _ in panels] == [
        ("mqar (n_pairs=4, seq_len=64)", "model.d_model", 3), ("mqar (n_pairs=16, seq_len=256)", "model.d_model", 3)]  # numbers in numeric order

    assert _findings_plots(summaries, tasks, tmp_path) and (tmp_path / "findings.png").stat().st_size > 0
    for s_ in summaries:  # no mixer that decodes (an experiment's training-only mixer): no state panel
        s_.state_bytes = None
    (tmp_path / "findings.png").unlink()
    assert _findings_plots(summaries, tasks, tmp_path) and (tmp_path / "findings.png").stat().st_size > 0


def test_a_run_keeps_its_row_when_the_state_size_aside_fails(monkeypatch):
    """The decode-state size is measured after training: a mixer that cannot decode (the registry
    says so) gets none without being stepped, and a failure there records its error beside the
    finished run's metrics instead of turning the whole run into an error row."""
    from zoo import sweep

    case = {"kind": "findings", "mixer": "lsh", "model": {"d_model": 32, "n_layers": 1, "max_len": 32,
                                                           "allow_causal_leak": True},
            "task": "mqar", "task_args": {"vocab": 16, "seq_len": 16, "n_pairs": 1, "train_size": 0, "test_size": 8},
            "train": {"max_steps": 2, "batch_size": 4, "warmup_steps": 1, "val_every": 2, "lr": 1e-3, "seed": 0}}
    result = sweep._train_case(case)
    assert result["state_bytes"] is None and "test/accuracy" in result["metrics"]

    def broken(cfg):
        raise RuntimeError("step is broken")

    monkeypatch.setattr(sweep, "_state_bytes", broken)
    result = sweep._train_case({**case, "mixer": "softmax"})
    assert result["state_bytes"] is None and result["state_bytes_error"] == "RuntimeError: step is broken"
    assert result["steps"] == 2 and "test/accuracy" in result["metrics"]


def test_the_runner_up_rate_tells_a_split_from_the_init_or_from_the_rate():
    """Softmax at width 32 with 16 pairs: 3e-3 reached the target on seeds 0 and 2, seed 1 stalled
    at the floor. The tuning's second rate, 1e-3, reached the target on seed 0 too; run on seed 1
    it stalls again (the init: the 0.684 mean stands and decides the claim) or learns (the rate:
    a rate chosen on another seed did not carry, so the claim stays open). A runner-up that failed
    the tuning seed too cannot tell, and the runner-up run never counts in the numbers."""
    def tune(lr, acc, reached):
        return row("w32", "attn", lr, 0, acc, val=[[reached, 0.5], [reached * 2, acc]])

    grid = [tune(3e-3, 0.999, 500), tune(1e-3, 0.994, 1250), tune(3e-4, 0.05, 1500)]
    seeds = [row("w32", "attn", 3e-3, 1, 0.061, chosen=3e-3, val=[[1500, 0.06], [3000, 0.061]]),
             row("w32", "attn", 3e-3, 2, 0.994, chosen=3e-3, val=[[500, 0.6], [1000, 0.994]])]
    rows = grid + seeds
    assert fd.runner_up(rows) == (1e-3, None)
    assert fd.runner_up_needed(1, rows, 0.99) is None
    assert fd.runner_up_needed(2, rows, 0.99) == "its run at the chosen rate did not stall"
    at_least = claim(kind="at_least", mixer="attn", settings=["w32"], value=0.95)
    (s,) = fd.summarize(rows)
    assert s.split and s.split_cause is None and fd.evaluate(at_least, rows)[0] == fd.INCONCLUSIVE

    def second(acc, val):
        r = row("w32", "attn", 1e-3, 1, acc, phase="runnerup", val=val)
        return {**r, "lr": 1e-3}

    init = rows + [second(0.067, [[1500, 0.06], [3000, 0.067]])]
    (s,) = fd.summarize(init)
    assert s.split_cause == "init" and s.values == [0.999, 0.061, 0.994]
    assert "SEEDS SPLIT (init: stalled at the runner-up rate too)" in s.flag_text()
    verdict, ours = fd.evaluate(at_least, init)
    assert verdict == fd.NOT_REPRODUCED and "(at the runner-up rate too: the init, not the rate)" in ours
    rate = rows + [second(0.995, [[1500, 0.5], [2000, 0.995]])]
    (s,) = fd.summarize(rate)
    assert s.split_cause == "rate" and "SEEDS SPLIT (rate: learned at the runner-up rate)" in s.flag_text()
    assert fd.evaluate(at_least, rate)[0] == fd.INCONCLUSIVE
    # a runner-up that failed the tuning seed too says nothing of seed 1's init
    weak = [tune(3e-3, 0.999, 500), tune(1e-3, 0.30, 1250), tune(3e-4, 0.05, 1500)] + seeds
    assert "cannot tell the init from the rate" in fd.runner_up_needed(1, weak, 0.99)
    (s,) = fd.summarize(weak + [{**second(0.067, [[1500, 0.06], [3000, 0.067]]), "lr": 1e-3}])
    assert s.split and s.split_cause is None


def test_a_split_runs_the_runner_up_rate_on_its_stalled_seed_only(tmp_path):
    """With findings.runner_up, the sweep runs the tuning's second rate on a seed that stalled
    beside one that learned, after every other run of its mixer and setting; elsewhere its rows
    read skipped, with why. A runner-up skipped before the seeds split is reopened on resume, and
    a finished sweep resumes to nothing."""
    from zoo.report import write_report
    from zoo.suite import cases, load_suite
    from zoo.sweep import case_status, run_suite

    p = tmp_path / "second.yaml"
    p.write_text(TINY.replace("seeds: [0, 1]", "seeds: [0, 1, 2]\n  runner_up: true"))
    suite = load_suite(str(p))
    second = [c for c in cases(suite) if c["phase"] == "runnerup"]
    assert {c["key"] for c in second} == {f"findings/p1/{m}/runnerup/seed={s}" for m in ("softmax", "linear")
                                          for s in (1, 2)}
    order = []

    def runner(case, timeout):  # softmax: 3e-3 reaches the target first, 1e-3 later; seed 1 stalls at both
        m, seed, lr = case["mixer"], case["train"]["seed"], case["train"]["lr"]
        order.append((case["key"], lr))
        curve = [[15, 0.995], [30, 0.995]] if lr == 3e-3 else [[15, 0.5], [30, 0.995]]
        if m == "linear":
            curve = [[15, 0.3], [30, 0.3]]
        if m == "softmax" and seed == 1:
            curve = [[15, 0.06], [30, 0.06]]
        return {"key": case["key"], "status": "ok", "wall_s": 0.0,
                "result": {"metrics": {"test/accuracy": curve[-1][1]}, "val_curve": curve, "val_loss": 0.1}}

    out = tmp_path / "out"
    run_suite(suite, out, progress=False, jobs=2, runner=runner)
    assert [x for x in order if "/runnerup/" in x[0]] == [("findings/p1/softmax/runnerup/seed=1", 1e-3)]
    softmax = [k for k, _ in order if "/softmax/" in k]
    assert softmax[-1] == "findings/p1/softmax/runnerup/seed=1"  # after the seed runs it judges
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    skipped = {r["key"]: r["reason"] for r in rows if r["status"] == "skipped"}
    assert skipped["findings/p1/softmax/runnerup/seed=2"] == "its run at the chosen rate did not stall"
    assert "the seeds did not split" in skipped["findings/p1/linear/runnerup/seed=1"]
    by = {x.mixer: x for x in fd.summarize(rows)}
    assert by["softmax"].split_cause == "init" and by["softmax"].values == [0.995, 0.06, 0.995]
    text = write_report(rows, out).read_text()
    assert "runner-up rate run on each stalled seed" in text and "(1 so far)" in text
    assert "3 runner-up rates where the seed's run had not stalled beside one that learned" in text
    again = []
    run_suite(suite, out, progress=False, jobs=2, runner=_scripted(again, lambda m, lr: 0.5))
    assert again == [] and dict(case_status(suite, out))["findings/p1/softmax/runnerup/seed=1"] == "ok"
    # a sweep from before the seeds split wrote it skipped: a resume reopens and runs it
    lines = [json.dumps({**r, "status": "skipped", "reason": "the seeds did not split", "result": None})
             if r["key"] == "findings/p1/softmax/runnerup/seed=1" else json.dumps(r) for r in rows]
    (out / "results.jsonl").write_text("\n".join(lines) + "\n")
    assert dict(case_status(suite, out))["findings/p1/softmax/runnerup/seed=1"] == (
        "pending (skipped before; the seeds now split)")
    order.clear()
    run_suite(suite, out, progress=False, jobs=2, runner=runner)
    assert order == [("findings/p1/softmax/runnerup/seed=1", 1e-3)]
    # made at a rate that is no longer the tuning's second choice: stale, and run again
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    (out / "results.jsonl").write_text("".join(json.dumps({**r, "lr": 3e-4} if r["key"].endswith("runnerup/seed=1")
                                                          and r["case"]["mixer"] == "softmax" else r) + "\n"
                                               for r in rows))
    assert dict(case_status(suite, out))["findings/p1/softmax/runnerup/seed=1"] == (
        "stale (lr 0.0003; the tuning's runner-up is now 0.001)")
    order.clear()
    run_suite(suite, out, progress=False, jobs=2, runner=runner)
    assert order == [("findings/p1/softmax/runnerup/seed=1", 1e-3)]
