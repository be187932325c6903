"""The Lightning harness end to end on the CPU: learning, resume, DDP, errors before training."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo
from zoo.cli import main as zoo_main
from zoo.config import Config, apply_overrides, from_dict
from zoo.train import TrainingModule, fit, resolve

SMALL = {
    "model": {"d_model": 64, "n_layers": 2, "mixer_args": {"n_heads": 2}},
    "task": {"name": "mqar", "args": {"vocab": 16, "seq_len": 16, "n_pairs": 1, "train_size": 2048, "test_size": 256}},
    "train": {"max_steps": 300, "lr": 3e-3, "warmup_steps": 20, "batch_size": 32, "val_every": 100, "progress": False},
}


def config(tmp_path, *overrides, base=SMALL):
    data = apply_overrides(base, [*overrides, "--train.log_dir", str(tmp_path), "--train.run_name", "run"])
    return from_dict(Config, data)


def test_softmax_learns_small_mqar(tmp_path):
    out = fit(config(tmp_path))
    assert out["metrics"]["test/accuracy"] >= 0.99, out
    assert "test/perplexity" not in out["metrics"]  # an accuracy task: no language-model metrics
    run = Path(out["run_dir"])
    assert zoo.load_config(run / "config.yaml").model.vocab_size == 16  # the task set it
    env = json.loads((run / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["threads"] >= 1
    assert json.loads((run / "metrics.json").read_text())["steps"] == 300
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/accuracy") for r in rows)


@pytest.mark.parametrize("mixer,task", [("mamba", "selective_copy"), ("linear", "selective_copy")])
def test_other_mixers_learn_above_chance(tmp_path, mixer, task):
    vocab = 8
    cfg = config(tmp_path, "--model.mixer", mixer, "--task.name", task, "--task.args",
                 f"{{vocab: {vocab}, seq_len: 16, n_tokens: 3, train_size: 2048, test_size: 256}}",
                 "--model.mixer_args", "{}")
    out = fit(cfg)
    chance = 1 / (vocab - 3)  # data tokens are 1..vocab-3
    assert out["metrics"]["test/accuracy"] > 2 * chance, out


@pytest.mark.parametrize("task,args,chance", [
    ("compression", "{vocab: 6, seq_len: 8, train_size: 0, test_size: 256}", 1 / 5),
    ("noisy_recall", "{vocab: 16, seq_len: 32, noise_vocab: 4, frac_noise: 0.2, train_size: 0, test_size: 256}", 1 / 6),
    ("memorization", "{vocab: 17, seq_len: 16, train_size: 0, test_size: 256}", 1 / 8),
])
def test_mad_tasks_are_learned(tmp_path, task, args, chance):
    """The MAD tasks train end to end (compression through the reconstruct head) well above chance."""
    out = fit(config(tmp_path, "--task.name", task, "--task.args", args))
    assert out["metrics"]["test/accuracy"] > 2 * chance, out  # seen: 0.74, 0.43 and 1.00


def _losses(run_dir):
    rows = csv.DictReader(open(Path(run_dir) / "metrics.csv"))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}


@pytest.mark.parametrize("train_size", [1000, 0])
def test_resume_mid_epoch_reproduces_the_uninterrupted_losses(tmp_path, train_size):
    """Interrupted at step 50 of 120: mid-pass over 1000 examples (31.25 batches a pass), and with
    fresh data (train_size 0). The resumed losses equal the uninterrupted ones step for step."""
    common = ["--train.max_steps", "120", "--train.val_every", "50", "--task.args.train_size", str(train_size)]
    whole = fit(config(tmp_path / "a", *common), log_every_n_steps=1)
    # the same run, interrupted at step 50 (its schedule still spans 120 steps)
    half = fit(config(tmp_path / "b", *common), log_every_n_steps=1, max_steps=50)
    ckpt = Path(half["run_dir"]) / "checkpoints" / "last.ckpt"
    resumed = fit(config(tmp_path / "c", *common), resume=str(ckpt), log_every_n_steps=1)
    a, c = _losses(whole["run_dir"]), _losses(resumed["run_dir"])
    later = [s for s in a if s > 50]
    assert len(later) >= 60 and all(s in c for s in later)
    assert all(a[s] == pytest.approx(c[s], rel=1e-6, abs=1e-7) for s in later)
    assert whole["metrics"]["test/loss"] == pytest.approx(resumed["metrics"]["test/loss"], rel=1e-6)


def test_training_batches_are_a_function_of_seed_step_and_rank():
    task = zoo.default_registry().build_task("mqar", vocab=16, seq_len=16, n_pairs=1, train_size=0, test_size=16,
                                             batch_size=8)
    task.setup()
    a, b = task.train_batch(5), task.train_batch(5)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], task.train_batch(6)[0])
    r0, r1 = task.train_batch(5, rank=0, world=2), task.train_batch(5, rank=1, world=2)
    assert not torch.equal(r0[0], r1[0])
    finite = zoo.default_registry().build_task("mqar", vocab=16, seq_len=16, n_pairs=1, train_size=20, test_size=16,
                                               batch_size=8)
    finite.setup()
    seen = torch.cat([finite.train_batch(s)[0] for s in range(5)])  # 40 rows: two passes over 20
    pool = finite.data["train"].tensors[0]
    for first_pass in (seen[:20], seen[20:]):  # each pass is a permutation of the 20 examples
        assert sorted(map(tuple, first_pass.tolist())) == sorted(map(tuple, pool.tolist()))


def test_ddp_two_cpu_processes_sync_metrics(tmp_path):
    """Two gloo processes; the test accuracy they report equals one process evaluating the
    final checkpoint on the whole test set (each rank saw half of it)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, "-m", "zoo.cli", "fit", "--train.devices", "2", "--train.strategy", "ddp",
            "--train.accelerator", "cpu", "--train.max_steps", "40", "--train.val_every", "20",
            "--train.log_dir", str(tmp_path), "--train.run_name", "ddp", "--train.progress", "false",
            "--model.d_model", "32", "--model.n_layers", "1", "--model.mixer_args", "{n_heads: 2}",
            "--task.args", "{vocab: 16, seq_len: 16, n_pairs: 1, train_size: 512, test_size: 64}"]
    r = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    module = TrainingModule.load_from_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt").eval()
    task = zoo.default_registry().build_task("mqar", vocab=16, seq_len=16, n_pairs=1, train_size=512, test_size=64)
    task.setup()
    x, y = task.data["test"].tensors
    with torch.no_grad():
        pred = module(x).argmax(-1)
    scored = y != -100
    assert out["metrics"]["test/accuracy"] == pytest.approx(((pred == y) & scored).sum().item() / scored.sum().item())


@pytest.mark.parametrize("overrides,message", [
    (["--task.name", "mqr"], r"unknown task 'mqr' \(did you mean 'mqar'"),
    (["--model.mixer", "linformer"], r"task 'mqar' \(a causal model\): sequence mixer 'linformer' cannot be causal"),
    (["--model.position", "learned", "--model.max_len", "8"], r"task 'mqar' \(train, length 16\): length 16 exceeds model.max_len=8"),
    (["--model.causal", "false"], r"model.causal=False conflicts with task 'mqar', which needs causal=True"),
    (["--train.max_steps", "0"], r"train.max_steps must be >= 1"),
    (["--train.lr", "fast"], r"train.lr must be float, got 'fast'"),
])
def test_bad_configs_fail_before_training(tmp_path, overrides, message):
    with pytest.raises(zoo.ZooConfigError, match=message):
        resolve(config(tmp_path, *overrides))
    assert not (tmp_path / "run").exists()


def test_cli_print_config_and_errors(tmp_path, capsys):
    assert zoo_main(["fit", "--task.name", "listops", "--model.mixer", "linformer", "--print_config"]) == 0
    printed = capsys.readouterr().out
    cfg = from_dict(Config, __import__("yaml").safe_load(printed))
    assert cfg.model.head == "classify" and cfg.model.n_classes == 10 and cfg.model.causal is False
    assert zoo_main(["fit", "--model.mixers", "softmax"]) == 2
    assert "unknown key 'mixers'" in capsys.readouterr().err
    assert zoo_main(["fit", "--config", str(tmp_path / "none.yaml")]) == 2


def test_a_diverging_run_stops_with_a_clear_error_and_status(tmp_path, capsys):
    args = ["fit", "--train.lr", "1000", "--train.grad_clip", "0", "--train.warmup_steps", "0",
            "--train.max_steps", "200", "--train.val_every", "50", "--train.log_dir", str(tmp_path),
            "--train.run_name", "boom", "--train.progress", "false", "--model.d_model", "32",
            "--model.mixer_args", "{n_heads: 2}", "--task.args", "{vocab: 16, seq_len: 16, n_pairs: 1, test_size: 16}"]
    assert zoo_main(args) == 3
    err = capsys.readouterr().err
    assert "training diverged: the loss is nan" in err or "training diverged: the loss is inf" in err, err
    out = json.loads((tmp_path / "boom" / "metrics.json").read_text())
    assert out["status"] == "diverged" and out["steps"] < 200


def test_resume_from_the_checkpoint_alone_keeps_folder_config_and_history(tmp_path, capsys):
    """`zoo fit --resume CKPT` with no --config: the checkpoint's config and run folder; the
    earlier session's metrics stay in metrics.csv."""
    args = ["fit", "--train.max_steps", "40", "--train.val_every", "20", "--train.log_dir", str(tmp_path),
            "--train.run_name", "r", "--train.progress", "false", "--model.d_model", "32", "--model.n_layers", "1",
            "--model.mixer", "linear", "--model.mixer_args", "{n_heads: 2}",
            "--task.args", "{vocab: 16, seq_len: 16, n_pairs: 1, train_size: 0, test_size: 16}"]
    assert zoo_main([*args[:2], "20", *args[3:]]) == 0  # stops at step 20
    steps_before = {int(r["step"]) for r in csv.DictReader(open(tmp_path / "r" / "metrics.csv"))}
    ckpt = tmp_path / "r" / "checkpoints" / "last.ckpt"
    assert zoo_main(["fit", "--resume", str(ckpt), "--train.max_steps", "40"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["r"]  # no new folder
    assert zoo.load_config(tmp_path / "r" / "config.yaml").model.mixer == "linear"
    steps_after = {int(r["step"]) for r in csv.DictReader(open(tmp_path / "r" / "metrics.csv"))}
    assert steps_before < steps_after and max(steps_after) > max(steps_before)
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["steps"] == 40
    # a fresh run into the same name is refused, nothing is touched
    capsys.readouterr()
    assert zoo_main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["steps"] == 40


@pytest.mark.parametrize("overrides,message", [
    (["--train.precision", "8-mixed"], r"Lightning refused the Trainer options.*precision='8-mixed'.*Precision '8-mixed' is invalid"),
    (["--train.accelerator", "tpu"], r"Lightning refused the Trainer options.*accelerator='tpu'"),
    (["--train.devices", "0"], r"Lightning refused the Trainer options.*devices=0"),
    (["--train.strategy", "ddpx"], r"Lightning refused the Trainer options.*strategy='ddpx'"),
    (["--train.threads", "-2"], r"train.threads must be >= 0"),
    (["--train.weight_decay", "-0.1"], r"train.weight_decay must be >= 0"),
    (["--train.max_steps", "1e3"], r"train.max_steps must be int, got 1000.0"),
    (["--train.log_dir", "/proc/nope"], r"train.log_dir: cannot create the run folder"),
    (["--resume", "/nonexistent.ckpt"], r"--resume: no checkpoint file at '/nonexistent.ckpt'"),
    (["--task.args.train_size", "-1"], r"mqar needs seq_len >= 1, train_size >= 0"),
])
def test_bad_training_options_are_clear_errors(tmp_path, capsys, overrides, message):
    args = ["fit", "--train.max_steps", "2", "--train.progress", "false", "--train.log_dir", str(tmp_path / "runs"),
            "--task.args", "{vocab: 16, seq_len: 16, n_pairs: 1, test_size: 16}", *overrides]
    assert zoo_main(args) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_silent_replacements_are_refused_or_said(tmp_path):
    with pytest.raises(zoo.ZooConfigError, match=r"model.vocab_size=100 conflicts with task 'mqar', which needs vocab_size=16"):
        resolve(config(tmp_path, "--model.vocab_size", "100"))
    with pytest.warns(UserWarning, match=r"'window' \(layer 0\) covers the whole sequence at seq_len 16"):
        resolve(config(tmp_path, "--model.mixer", "window", "--model.mixer_args", "{window: {n_heads: 2, window: 64}}"))


def test_a_suite_whose_window_covers_the_sequence_is_refused_at_load(tmp_path):
    from zoo.suite import cases, load_suite

    path = tmp_path / "s.yaml"
    path.write_text("quality:\n  mixers: [window]\n  tasks: {mqar: {vocab: 16, seq_len: 16, n_pairs: 1}}\n"
                    "  model: {d_model: 32, mixer_args: {window: {n_heads: 2, window: 16}}}\n")
    with pytest.raises(zoo.ZooConfigError, match=r"window covers the whole sequence of task 'mqar' \(seq_len 16\)"):
        cases(load_suite(str(path)))
    path.write_text("quality:\n  mixers: [lsh]\n  tasks: {mqar: {vocab: 16, seq_len: 16, n_pairs: 1}}\n"
                    "  model: {d_model: 32, mixer_args: {n_heads: 2, bucket_size: 4}}\n")
    with pytest.raises(zoo.ZooConfigError, match=r"mixer 'lsh' is causal in its mask only.*allow_causal_leak"):
        cases(load_suite(str(path)))


def test_fit_help_lists_every_key_and_print_config_shows_task_defaults(capsys):
    with pytest.raises(SystemExit):
        zoo_main(["fit", "--help"])
    out = capsys.readouterr().out
    for key in ("--model.mixer", "--model.position (default: 'auto')", "--train.data_seed", "--train.stop_at",
                "--task.args.KEY"):
        assert key in out, key
    assert zoo_main(["fit", "--print_config"]) == 0
    printed = __import__("yaml").safe_load(capsys.readouterr().out)
    assert printed["task"]["args"]["n_pairs"] == 8 and printed["model"]["position"] == "learned"


def test_report_compare_on_two_fit_runs_and_on_nothing(tmp_path, capsys):
    a, b = (fit(config(tmp_path / n, "--train.max_steps", "20", "--train.val_every", "10"))["run_dir"] for n in "ab")
    assert zoo_main(["report", a, b, "--compare"]) == 0
    text = (Path(b).parent / "compare.md").read_text()  # beside the inputs
    assert "| test/accuracy |" in text and "| steps | 20 | 20 |" in text
    (tmp_path / "empty").mkdir()
    assert zoo_main(["report", str(tmp_path / "empty"), a, "--compare"]) == 2
    assert "holds neither zoo bench results" in capsys.readouterr().err


def test_compiled_training_follows_the_eager_losses(tmp_path):
    """train.compile: true trains the same model (same losses to rounding) and its checkpoint
    keeps the eager parameter names, so it loads without compiling."""
    short = ["--train.max_steps", "20", "--train.val_every", "10"]
    eager = fit(config(tmp_path / "eager", *short))
    compiled = fit(config(tmp_path / "compiled", *short, "--train.compile", "true"))
    a, b = _losses(eager["run_dir"]), _losses(compiled["run_dir"])
    assert a.keys() == b.keys() and a
    assert all(abs(a[s] - b[s]) <= 1e-3 * max(1.0, abs(a[s])) for s in a), (a, b)
    ckpt = torch.load(Path(compiled["run_dir"]) / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any("_orig_mod" in k for k in ckpt["state_dict"])


def test_loggers_are_chosen_by_name(tmp_path):
    with pytest.raises(zoo.ZooConfigError, match=r"unknown logger in train.loggers 'tensorbord' \(did you mean 'tensorboard'"):
        config(tmp_path, "--train.loggers", "[csv, tensorbord]")


def test_ssm_parameters_marked_no_weight_decay_are_not_decayed(tmp_path):
    """Mamba's A_log and D carry mamba-ssm's ``_no_weight_decay`` mark; the optimiser honours it
    (decaying A_log would pull every state's decay rate to the same value)."""
    cfg = config(tmp_path, "--model.mixer", "mamba", "--model.mixer_args", "{}")
    module = TrainingModule(zoo.config.to_dict(resolve(cfg)[0]))
    decay, no_decay = module.configure_optimizers()["optimizer"].param_groups
    assert decay["weight_decay"] == cfg.train.weight_decay > 0 and no_decay["weight_decay"] == 0.0
    mamba = module.model.blocks[0].mixer
    in_group = lambda p, g: any(p is q for q in g["params"])  # noqa: E731
    assert in_group(mamba.A_log, no_decay) and in_group(mamba.D, no_decay)
    assert in_group(mamba.in_proj.weight, decay) and not in_group(mamba.A_log, decay)


def test_zoo_test_evaluates_a_checkpoint_as_fit_did(tmp_path, capsys):
    out = fit(config(tmp_path, "--train.max_steps", "40", "--train.val_every", "20"))
    ckpt = Path(out["run_dir"]) / "checkpoints" / "last.ckpt"
    before = sorted(p.name for p in Path(out["run_dir"]).rglob("*"))
    capsys.readouterr()
    assert zoo_main(["test", str(ckpt)]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again == pytest.approx(out["metrics"])
    assert sorted(p.name for p in Path(out["run_dir"]).rglob("*")) == before  # it wrote nothing
    assert zoo_main(["test", str(ckpt), "--split", "train"]) == 2
    assert "unknown split to evaluate 'train'" in capsys.readouterr().err


def test_other_trainer_options_pass_through_and_progress_counts_steps(tmp_path, capfd):
    out = fit(config(tmp_path, "--train.max_steps", "30", "--train.val_every", "10", "--train.progress", "true",
                     "--train.trainer", "{limit_val_batches: 1, accumulate_grad_batches: 1}"))
    assert out["steps"] == 30
    captured = capfd.readouterr()
    assert "steps: 100%" in captured.out + captured.err and "30/30" in captured.out + captured.err  # steps of max_steps


@pytest.mark.parametrize("options,message", [
    ("{max_epoch: 3}", r"unknown Lightning Trainer option in train.trainer 'max_epoch' \(did you mean 'max_epochs'"),
    ("{max_steps: 3}", r"train.trainer.max_steps: the zoo sets it; use train.max_steps"),
    ("{gradient_clip_val: 3}", r"train.trainer.gradient_clip_val: the zoo sets it; use train.grad_clip"),
])
def test_trainer_options_the_zoo_owns_or_does_not_know_are_named(tmp_path, options, message):
    with pytest.raises(zoo.ZooConfigError, match=message):
        fit(config(tmp_path, "--train.trainer", options))


def test_a_text_task_reports_bits_per_character(tmp_path):
    out = fit(config(tmp_path, "--task.name", "text", "--task.args", "{seq_len: 16, train_size: 64, test_size: 16}",
                     "--train.max_steps", "10", "--train.val_every", "5"))
    assert out["metrics"]["test/bits_per_char"] > 0 and "test/perplexity" in out["metrics"]
