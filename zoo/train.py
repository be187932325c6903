"""Training: ``TrainingModule`` (a LightningModule) and the Trainer that ``zoo fit`` runs.

Lightning does the loop, devices, precision, checkpoints and logging; torchmetrics does the
metrics. What is the zoo's own: the loss over the scored positions plus the model's auxiliary
losses, the metrics a task asks for, and the run directory (resolved config, environment, final
metrics).

    run dir  runs/<name>/  config.yaml  environment.json  metrics.json  checkpoints/  metrics.csv
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import callbacks as cb
from lightning.pytorch.loggers import CSVLogger

from zoo.config import Config, ModelConfig, TrainConfig, dump_config, from_dict, to_dict
from zoo.errors import ZooConfigError, ZooDiverged, unknown
from zoo.measure import environment, set_allocator
from zoo.model import build_model, resolve_position
from zoo.registry import TASKS, default_registry
from zoo.tasks.base import IGNORE, Task

# Messages a user of `zoo fit` cannot act on, silenced here and nowhere else: the run folder is
# the zoo's own (created and guarded by _prepare_run_dir, so the CSV logger's "not empty" is
# expected), the _pytree deprecation is Lightning's own call into PyTorch, and the logger tip
# advertises a hosted service.
for _message in (r"Experiment logs directory .* exists and is not empty", r"`isinstance\(treespec, LeafSpec\)`"):
    warnings.filterwarnings("ignore", message=_message)


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoTips())


class TrainingModule(L.LightningModule):
    """A model from a config, trained on a task's (tokens, targets).

    ``config`` is the resolved config as a plain dict (so the checkpoint alone rebuilds the
    module); ``test_names`` names the task's test sets."""

    flops_per_batch = None  # not counted: ThroughputMonitor then reports samples/s and tokens/s only

    def __init__(self, config: dict, test_names: list[str] | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.cfg: Config = from_dict(Config, config)
        self.model = build_model(self.cfg.model)
        if self.cfg.train.compile:  # in place (nn.Module.compile): the state dict keeps its names
            self.model.compile()
        m = self.cfg.model
        self.lm = m.head in ("lm", "reconstruct")  # logits and targets per position
        # perplexity and bits per character only where the task is scored by them (text); on a
        # recall or copying task they are noise next to its accuracy
        metric = default_registry().get(TASKS, self.cfg.task.name).metric if self.cfg.task.name else ""
        self.text_metrics = self.lm and metric in ("perplexity", "bits_per_char")
        classes = m.vocab_size if self.lm else m.n_classes
        self.test_names = list(test_names or ["test"])

        def metrics() -> torchmetrics.MetricCollection:
            # micro: every scored position counts once (torchmetrics' multiclass default is macro)
            ms = {"accuracy": torchmetrics.classification.MulticlassAccuracy(
                classes, average="micro", ignore_index=IGNORE)}
            if self.text_metrics:
                ms["perplexity"] = torchmetrics.text.Perplexity(ignore_index=IGNORE)
            return torchmetrics.MetricCollection(ms)

        self.val_metrics = metrics()
        self.test_metrics = torch.nn.ModuleDict({name.replace(".", "_"): metrics() for name in self.test_names})

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.lm:
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
        return F.cross_entropy(logits.float(), targets)

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        logits = self(tokens)
        task_loss = self.loss(logits, targets)
        aux = self.model.aux_losses()
        loss = task_loss + sum(aux.values()) if aux else task_loss
        self.log("train/loss", task_loss, prog_bar=True)
        for name, value in aux.items():
            self.log(f"train/{name}", value)
        for name, value in self.model.aux_metrics().items():
            self.log(f"train/{name}", value)
        return loss

    def _update(self, metrics, batch) -> torch.Tensor:
        tokens, targets = batch
        logits = self(tokens)
        loss = self.loss(logits, targets)
        if self.lm:
            metrics["accuracy"].update(logits.flatten(0, 1), targets.flatten())
            if self.text_metrics:
                metrics["perplexity"].update(logits.float(), targets)
        else:
            metrics["accuracy"].update(logits, targets)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._update(self.val_metrics, batch), prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self):
        self._log_metrics("val", self.val_metrics)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        name = self.test_names[dataloader_idx]
        loss = self._update(self.test_metrics[name.replace(".", "_")], batch)
        self.log(f"{name}/loss", loss, sync_dist=True, add_dataloader_idx=False)

    def on_test_epoch_end(self):
        for name in self.test_names:
            self._log_metrics(name, self.test_metrics[name.replace(".", "_")])

    def _log_metrics(self, prefix: str, metrics: torchmetrics.MetricCollection) -> None:
        values = metrics.compute()  # torchmetrics syncs the states across ranks
        for key, value in values.items():
            self.log(f"{prefix}/{key}", value, prog_bar=key == "accuracy")
        if "perplexity" in values:
            self.log(f"{prefix}/bits_per_char", torch.log2(values["perplexity"]))
        metrics.reset()

    def configure_optimizers(self):
        t = self.cfg.train
        # Weight decay on matrices only, and never on a parameter marked ``_no_weight_decay``
        # (mamba-ssm's convention: an SSM's A and D, whose decay would pull every state's decay
        # rate to the same value and undo their initialisation).
        params = [p for p in self.parameters() if p.requires_grad]
        exempt = [p.dim() < 2 or getattr(p, "_no_weight_decay", False) for p in params]
        decay = [p for p, x in zip(params, exempt, strict=True) if not x]
        no_decay = [p for p, x in zip(params, exempt, strict=True) if x]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(0.9, 0.95))

        def schedule(step: int) -> float:  # linear warm-up, then cosine to min_lr_ratio
            if step < t.warmup_steps:
                return (step + 1) / t.warmup_steps
            progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
            return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class StopOnNonFinite(cb.Callback):
    """Stops training with :class:`ZooDiverged` when the training loss is NaN or inf, checked
    every ``every`` steps (one host sync each; a diverged run stays diverged, so a late check
    loses nothing but those steps)."""

    def __init__(self, every: int):
        self.every = max(1, every)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        step = trainer.global_step
        if loss is not None and (step % self.every == 0 or step == 1) and not torch.isfinite(loss).item():
            raise ZooDiverged(step, float(loss))


# -- putting a run together ----------------------------------------------------------------------
def resolve(cfg: Config) -> tuple[Config, Task]:
    """The task, and the config with the model fitted to it; every error before training."""
    reg = default_registry()
    data_seed = cfg.train.seed if cfg.train.data_seed is None else cfg.train.data_seed
    task = reg.build_task(cfg.task.name, batch_size=cfg.train.batch_size, seed=data_seed, **cfg.task.args)
    over = task.model_overrides()
    defaults = ModelConfig()
    model = to_dict(cfg.model)
    for key in ("causal", "head", "vocab_size", "n_classes"):
        if key in over and model[key] != getattr(defaults, key) and model[key] != over[key]:
            raise ZooConfigError(f"model.{key}={model[key]!r} conflicts with task {cfg.task.name!r}, which needs "
                                 f"{key}={over[key]!r}")
    model.update(over)
    model["position"] = resolve_position(from_dict(ModelConfig, model, "model"))
    cfg = Config(model=from_dict(ModelConfig, model, "model"), task=cfg.task, train=cfg.train)
    try:
        net = build_model(cfg.model)
    except ZooConfigError as e:
        kind = "causal" if cfg.model.causal else "bidirectional"
        raise ZooConfigError(f"task {cfg.task.name!r} (a {kind} model): {e}") from e
    for i, block in enumerate(net.blocks):
        if getattr(block.mixer, "full_at", lambda n: False)(task.seq_len):
            warnings.warn(f"model.mixer {cfg.model.mixers[i]!r} (layer {i}) covers the whole sequence at "
                          f"seq_len {task.seq_len}: it computes full attention ({block.mixer.extra_repr()})",
                          stacklevel=2)
    task.setup("fit")
    with torch.no_grad():  # a dry forward at every length the run will see: sizes that do not fit fail now
        for name in ("train", *task.test_names()):
            tokens = task.example()[0] if name == "train" else task.data[name].tensors[0][:1]
            try:
                net(tokens)
            except ZooConfigError as e:
                raise ZooConfigError(f"task {cfg.task.name!r} ({name}, length {tokens.shape[1]}): {e}") from e
    return cfg, task


def run_name(cfg: Config) -> str:
    mixers = "+".join(dict.fromkeys(cfg.model.mixers))
    return cfg.train.run_name or f"{cfg.task.name}-{mixers}-{time.strftime('%Y%m%d-%H%M%S')}"


def _passed_through(options: dict[str, Any], own: set[str]) -> dict[str, Any]:
    """``train.trainer``: Lightning Trainer options the zoo has no key of its own for."""
    import inspect

    accepted = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    for key in options:
        if key in own:
            mine = {"gradient_clip_val": "grad_clip", "val_check_interval": "val_every", "logger": "loggers",
                    "enable_progress_bar": "progress"}.get(key, key)
            raise ZooConfigError(f"train.trainer.{key}: the zoo sets it; use train.{mine}"
                                 if mine in TrainConfig.__dataclass_fields__
                                 else f"train.trainer.{key}: the zoo sets this Trainer option itself")
        if key not in accepted:
            raise unknown("Lightning Trainer option in train.trainer", key, sorted(accepted - own))
    return dict(options)


class StepProgressBar(cb.TQDMProgressBar):
    """Training progress in optimizer steps out of ``train.max_steps``: the batches are endless
    (fresh or reshuffled every pass), so an epoch has no length to count against."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.reset(total=trainer.max_steps)
        self.train_progress_bar.n = trainer.global_step  # a resumed run starts where it stopped
        self.train_progress_bar.set_description("steps")

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_batch_end(trainer, *args)
        if trainer.global_step % max(1, self.refresh_rate) == 0 or trainer.global_step == trainer.max_steps:
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.refresh()


def build_trainer(cfg: Config, run_dir: Path, **overrides: Any) -> L.Trainer:
    t = cfg.train
    callbacks = [
        cb.ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0,
                           every_n_train_steps=t.val_every),
        cb.LearningRateMonitor(logging_interval="step"),
        StopOnNonFinite(min(50, t.val_every)),
        cb.ThroughputMonitor(batch_size_fn=lambda batch: batch[0].shape[0], length_fn=lambda batch: batch[0].numel()),
    ]
    if t.progress:
        callbacks.append(StepProgressBar())
    if t.early_stop_patience:
        callbacks.append(cb.EarlyStopping(monitor="val/loss", patience=t.early_stop_patience))
    if t.stop_at:  # Zoology's rule: done once validation accuracy reaches the target
        callbacks.append(cb.EarlyStopping(monitor="val/accuracy", mode="max", stopping_threshold=t.stop_at,
                                          patience=10**9, check_on_train_epoch_end=False))
    loggers = [CSVLogger(run_dir, name="", version="")]  # always: the zoo reads metrics.csv back
    if "tensorboard" in t.loggers:
        if not (importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")):
            raise ZooConfigError("train.loggers names tensorboard, which is not installed (pip install tensorboard)")
        from lightning.pytorch.loggers import TensorBoardLogger
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=""))
    kwargs = dict(
        max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices, strategy=t.strategy,
        num_nodes=t.num_nodes, precision=t.precision, gradient_clip_val=t.grad_clip or None,
        val_check_interval=t.val_every, check_val_every_n_epoch=None, log_every_n_steps=min(50, t.val_every),
        callbacks=callbacks, logger=loggers, default_root_dir=run_dir, enable_progress_bar=t.progress,
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    kwargs.update(_passed_through(t.trainer, set(kwargs)))
    kwargs.update(overrides)
    try:
        return L.Trainer(**kwargs)
    except (ValueError, TypeError, RuntimeError, ImportError, MisconfigurationException) as e:
        chosen = (f"accelerator={t.accelerator!r}, devices={t.devices!r}, strategy={t.strategy!r}, "
                  f"num_nodes={t.num_nodes!r}, precision={t.precision!r}")
        raise ZooConfigError(f"train: Lightning refused the Trainer options ({chosen}): {e}") from e


def checkpoint_config(path: str | Path) -> dict:
    """The config a checkpoint was trained with, with its run folder as the run to continue
    (``train.log_dir`` and ``train.run_name``) when it lies in ``<log_dir>/<name>/checkpoints/``."""
    path = Path(path)
    if not path.is_file():
        raise ZooConfigError(f"--resume: no checkpoint file at {str(path)!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        data = ckpt["hyper_parameters"]["config"]
    except Exception as e:  # not a zoo checkpoint, or not a checkpoint at all
        raise ZooConfigError(
            f"--resume: {str(path)!r} is not a checkpoint written by zoo fit ({type(e).__name__})") from e
    if path.parent.name == "checkpoints":
        run = path.parent.parent
        data["train"] = {**data.get("train", {}), "log_dir": str(run.parent), "run_name": run.name}
    return data


def _prepare_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """The run folder: created, refused when it holds another run (unless ``overwrite``)."""
    used = (run_dir / "metrics.json").exists() or (run_dir / "checkpoints").exists()
    if used and not resume:
        if not overwrite:
            raise ZooConfigError(
                f"train.run_name: the run folder {str(run_dir)!r} already holds a run; choose another "
                "train.run_name, continue it with --resume, or set train.overwrite true to replace it")
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ZooConfigError(f"train.log_dir: cannot create the run folder {str(run_dir)!r}: {e.strerror}") from e


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a run's metrics.csv (a run folder or the file itself); [] when there is none."""
    path = Path(path)
    path = path / "metrics.csv" if path.is_dir() else path
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _keep_history(path: Path, earlier: list[dict]) -> None:
    """metrics.csv after a resume: the earlier session's rows before the first new step, then the
    new rows (Lightning's CSV logger starts the file anew)."""
    new = read_metrics(path)
    if not earlier:
        return
    first = min((int(r["step"]) for r in new if r.get("step")), default=None)
    kept = [r for r in earlier if first is None or (r.get("step") and int(r["step"]) < first)]
    keys = list(dict.fromkeys(k for r in kept + new for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(kept + new)


def fit(cfg: Config, resume: str | None = None, **trainer_overrides: Any) -> dict:
    """Train and test one config; returns the final metrics (also in <run dir>/metrics.json).

    Every error in the config, the task, the Trainer options or the run folder is raised before
    anything is written. A diverged run raises :class:`ZooDiverged` after writing its status."""
    if resume is not None and not Path(resume).is_file():
        raise ZooConfigError(f"--resume: no checkpoint file at {resume!r}")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    set_allocator(cfg.train.allocator)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    cfg, task = resolve(cfg)
    run_dir = Path(cfg.train.log_dir) / run_name(cfg)
    trainer = build_trainer(cfg, run_dir, **trainer_overrides)
    _prepare_run_dir(run_dir, resume, cfg.train.overwrite)
    earlier = read_metrics(run_dir / "metrics.csv") if resume else []
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module = TrainingModule(to_dict(cfg), test_names=task.test_names())
    start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=task, ckpt_path=resume)
    except ZooDiverged as e:
        if trainer.is_global_zero:
            out = {"status": "diverged", "error": str(e), "steps": e.step, "train_seconds": time.perf_counter() - start,
                   "params": module.model.num_params(), "run_dir": str(run_dir)}
            (run_dir / "metrics.json").write_text(json.dumps(out, indent=2))
        raise ZooDiverged(e.step, e.loss, str(run_dir)) from None
    finally:
        if trainer.is_global_zero and resume:
            _keep_history(run_dir / "metrics.csv", earlier)
    seconds = time.perf_counter() - start
    results = trainer.test(module, datamodule=task, verbose=False)
    metrics = {k: float(v) for r in results for k, v in r.items()}
    out = {"status": "ok", "metrics": metrics, "train_seconds": seconds, "steps": trainer.global_step,
           "params": module.model.num_params(), "run_dir": str(run_dir)}
    if trainer.is_global_zero:
        (run_dir / "environment.json").write_text(json.dumps(environment(module.device), indent=2))
        (run_dir / "metrics.json").write_text(json.dumps(out, indent=2))
    return out


def evaluate(checkpoint: str | Path, split: str = "test") -> dict[str, float]:
    """A checkpoint's metrics on its own task's test sets (``split="test"``) or validation set
    (``"val"``), rebuilt from the config the checkpoint was trained with. Writes nothing."""
    data = checkpoint_config(checkpoint)
    if split not in ("test", "val"):
        raise unknown("split to evaluate", split, ["test", "val"])
    cfg, task = resolve(from_dict(Config, data, where=f"the config of {checkpoint}"))
    module = TrainingModule.load_from_checkpoint(checkpoint, map_location="cpu")
    trainer = build_trainer(cfg, Path(cfg.train.log_dir) / (cfg.train.run_name or "evaluate"), logger=False,
                            callbacks=[], enable_checkpointing=False)
    run = trainer.test if split == "test" else trainer.validate
    results = run(module, datamodule=task, verbose=False)
    return {k: float(v) for r in results for k, v in r.items()}
