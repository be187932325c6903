"""The Lightning harness end to end on the CPU: learning, resume, DDP, errors before training."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo
from zoo.cli import main as zoo_main
from zoo.config import Config, apply_overrides, from_dict
from zoo.train import ZooModule, fit, resolve

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


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    def losses(run_dir):
        rows = csv.DictReader(open(Path(run_dir) / "metrics.csv"))
        return {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}

    common = ["--train.max_steps", "120", "--train.val_every", "60", "--task.args.train_size", "1920"]
    whole = fit(config(tmp_path / "a", *common), log_every_n_steps=1)
    # the same run, interrupted at step 60 (its schedule still spans 120 steps)
    half = fit(config(tmp_path / "b", *common), log_every_n_steps=1, max_steps=60)
    ckpt = Path(half["run_dir"]) / "checkpoints" / "last.ckpt"
    resumed = fit(config(tmp_path / "c", *common), resume=str(ckpt), log_every_n_steps=1)
    a, c = losses(whole["run_dir"]), losses(resumed["run_dir"])
    later = [s for s in a if s > 60]
    assert later and all(s in c for s in later)
    assert all(a[s] == pytest.approx(c[s], rel=1e-6, abs=1e-7) for s in later)
    assert whole["metrics"]["test/loss"] == pytest.approx(resumed["metrics"]["test/loss"], rel=1e-6)


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
    module = ZooModule.load_from_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.ckpt").eval()
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
