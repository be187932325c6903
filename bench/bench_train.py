"""Training throughput: TrainingModule under the Lightning Trainer vs a plain PyTorch loop.

The same model, optimiser, schedule, gradient clipping and batches (mqar, softmax, d_model
256, 4 layers, seq 128, batch 32, fp32); each side trains ``--steps`` steps from the same
initial weights, alternating sides over ``--rounds`` rounds; tokens/s is steps * batch * length
over wall time. The Lightning side keeps the harness's callbacks and CSV logging (validation
off, as a plain loop has none).

    python bench/bench_train.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch

from zoo.config import Config, from_dict, to_dict
from zoo.measure import environment
from zoo.train import TrainingModule, build_trainer, resolve

CFG = {
    "model": {"d_model": 256, "n_layers": 4, "mixer_args": {"n_heads": 4}},
    "task": {"name": "mqar", "args": {"vocab": 64, "seq_len": 128, "n_pairs": 16, "train_size": 8192}},
    "train": {"batch_size": 32, "lr": 1e-3, "warmup_steps": 10, "progress": False},
}


def lightning_run(cfg: Config, task, init, steps: int, log_dir: str) -> float:
    module = TrainingModule(to_dict(cfg), test_names=task.test_names())
    module.load_state_dict(init)
    trainer = build_trainer(cfg, __import__("pathlib").Path(log_dir), max_steps=steps, limit_val_batches=0,
                            enable_checkpointing=True)
    start = time.perf_counter()
    trainer.fit(module, datamodule=task)
    return time.perf_counter() - start


def plain_run(cfg: Config, task, init, steps: int) -> float:
    module = TrainingModule(to_dict(cfg), test_names=task.test_names())
    module.load_state_dict(init)
    opt_cfg = module.configure_optimizers()
    opt, sched = opt_cfg["optimizer"], opt_cfg["lr_scheduler"]["scheduler"]
    loader = task.train_dataloader()
    start = time.perf_counter()
    step = 0
    while step < steps:
        for tokens, targets in loader:
            logits = module(tokens)
            loss = module.loss(logits, targets) + sum(module.model.aux_losses().values(), torch.tensor(0.0))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            step += 1
            if step == steps:
                break
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    cfg = from_dict(Config, copy.deepcopy(CFG))
    cfg, task = resolve(cfg)
    init = TrainingModule(to_dict(cfg), test_names=task.test_names()).state_dict()
    tokens = a.steps * cfg.train.batch_size * 128
    env = environment()
    print(f"torch {env['torch']}, {env['threads']} threads, {a.steps} steps, batch {cfg.train.batch_size}, seq 128")
    ratios, lt, pt = [], [], []
    with tempfile.TemporaryDirectory() as d:
        plain_run(cfg, task, init, 5)  # warm-up
        for r in range(a.rounds):
            if r % 2:
                t_l, t_p = lightning_run(cfg, task, init, a.steps, d), plain_run(cfg, task, init, a.steps)
            else:
                t_p, t_l = plain_run(cfg, task, init, a.steps), lightning_run(cfg, task, init, a.steps, d)
            lt.append(tokens / t_l)
            pt.append(tokens / t_p)
            ratios.append(t_p / t_l)
    print("\n| side | tokens/s (median) |\n|---|---|")
    print(f"| Lightning Trainer + TrainingModule | {statistics.median(lt):,.0f} |")
    print(f"| plain PyTorch loop | {statistics.median(pt):,.0f} |")
    print(f"\nthroughput ratio Lightning / plain: {statistics.median(ratios):.3f} (rounds: "
          + ", ".join(f"{x:.3f}" for x in ratios) + ")")


if __name__ == "__main__":
    main()
