"""The model: Embedding -> [Block x L] -> Head, with mixers chosen by name from the registry.

    Block = x + Mixer(Norm(x)); x + ChannelMixer(Norm(x))        (pre-norm)
          = Norm(x + Mixer(x)); Norm(x + ChannelMixer(x))        (post-norm)

Auxiliary outputs, one mechanism: a module (at any depth) that has them declares
``self.aux_losses = {}`` and/or ``self.aux_metrics = {}`` in ``__init__`` and fills them with
named scalars during its forward. ``ZooModel.aux_losses()`` sums the losses by name over the
layers (the training loop adds them to the loss and logs each name); ``aux_metrics()`` returns
the detached diagnostics as ``layer<i>/<name>``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from zoo.config import Config, ModelConfig, from_dict
from zoo.errors import ZooConfigError
from zoo.nn.positions import LearnedPosition, SinusoidalPosition
from zoo.registry import Registry, accepted_kwargs, default_registry


def make_norm(kind: str, d_model: int) -> nn.Module:
    return nn.LayerNorm(d_model) if kind == "layernorm" else nn.RMSNorm(d_model)


class Block(nn.Module):
    def __init__(self, mixer: nn.Module, channel: nn.Module, cfg: ModelConfig):
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.norm1, self.norm2 = make_norm(cfg.norm, cfg.d_model), make_norm(cfg.norm, cfg.d_model)
        self.mixer, self.channel = mixer, channel
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        return self._channel(self._mix(x, self.mixer))


    def init_state(self, batch: int) -> dict[str, Any]:
        """The block's decode state: its sequence mixer's, and its channel mixer's when that has
        one (MoE with a causal capacity counts each expert's choices); else None."""
        channel = self.channel.init_state(batch) if hasattr(self.channel, "step") else None
        return {"mixer": self.mixer.init_state(batch), "channel": channel}

    def step(self, x_t: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:  # (B, d)
        out: dict[str, Any] = {}

        def mix(h: torch.Tensor) -> torch.Tensor:
            y, out["mixer"] = self.mixer.step(h, state["mixer"])
            return y

        def channel(h: torch.Tensor) -> torch.Tensor:  # (B, 1, d)
            if state["channel"] is None:
                out["channel"] = None
                return self.channel(h)
            y, out["channel"] = self.channel.step(h[:, 0], state["channel"])
            return y[:, None]

        x_t = self._mix(x_t, mix)
        return self._channel(x_t[:, None], channel)[:, 0], out

    def _mix(self, x: torch.Tensor, mixer) -> torch.Tensor:
        if self.pre:
            return x + self.drop(mixer(self.norm1(x)))
        return self.norm1(x + self.drop(mixer(x)))

    def _channel(self, x: torch.Tensor, channel=None) -> torch.Tensor:
        channel = channel or self.channel
        if self.pre:
            return x + self.drop(channel(self.norm2(x)))
        return self.norm2(x + self.drop(channel(x)))


def mixer_kwargs(registry: Registry, pattern: list[str], args: dict[str, Any], what: str):
    """Split ``args`` into per-mixer keyword dicts (see :mod:`zoo.config`): a shared key goes to
    every mixer of ``pattern`` that takes it (and must be taken by one), a mixer's own name holds
    its own arguments. ``what`` names ``args`` in errors (``model.mixer_args``)."""
    names = list(dict.fromkeys(pattern))
    accepts = {n: accepted_kwargs(registry.mixer(n).cls) for n in names}
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    # a mixer of the same kind that is not in the pattern: its dict is kept for when it is
    others = {o for kind in {registry.mixer(n).kind for n in names} for o in registry.names(kind)}
    for key, value in args.items():
        if key in names or key in others:
            if not isinstance(value, dict):
                raise ZooConfigError(f"{what}.{key} must be a mapping of {key}'s hyper-parameters")
            if key in names:
                out[key].update(value)
            continue
        takers = [n for n in names if key in accepts[n][0] or accepts[n][1]]
        if not takers:
            allowed = sorted(set().union(*(accepts[n][0] for n in names)) | set(names))
            raise ZooConfigError(
                f"{what}: no mixer of {names} takes {key!r}; allowed keys: {', '.join(allowed)}"
            )
        for n in takers:
            out[n].setdefault(key, value)
    return out


class ReconstructHead(nn.Module):
    """The decoder of MAD's compression task (Poli et al. 2024): the whole sequence must pass
    through the last position's state ``z`` (B, d); each output position t reads z plus a fixed
    sinusoidal code of t through a non-expanding two-layer MLP, then the logits (B, T, vocab)."""

    def __init__(self, d_model: int, vocab_size: int, max_len: int, norm: str):
        super().__init__()
        self.pos = SinusoidalPosition(d_model, max_len)
        self.mlp = nn.Sequential(make_norm(norm, d_model), nn.Linear(d_model, d_model), nn.GELU(),
                                 make_norm(norm, d_model), nn.Linear(d_model, d_model), nn.GELU(),
                                 make_norm(norm, d_model))
        self.out = nn.Linear(d_model, vocab_size)

    def forward(self, z: torch.Tensor, length: int) -> torch.Tensor:
        x = z[:, None, :] + self.pos(0, length)  # (B, T, d)
        return self.out(self.mlp(x))  # (B, T, vocab)


class ZooModel(nn.Module):
    """Token embedding, additive position, blocks, final norm and a head: a next-token (``lm``),
    a sequence-class (``classify``) or a whole-sequence-from-its-last-state (``reconstruct``) one."""

    def __init__(self, cfg: ModelConfig, registry: Registry | None = None):
        super().__init__()
        reg = registry or default_registry()
        if cfg.position == "auto":
            cfg = dataclasses.replace(cfg, position=resolve_position(cfg, reg))
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.embed_std)
        if cfg.position == "learned":
            self.pos = LearnedPosition(cfg.d_model, cfg.max_len, std=cfg.embed_std)
        else:
            self.pos = SinusoidalPosition(cfg.d_model, cfg.max_len) if cfg.position == "sinusoidal" else None
        self.drop = nn.Dropout(cfg.dropout)

        for n in cfg.mixers:
            if reg.mixer(n).kind != "sequence_mixers":
                raise ZooConfigError(f"model.mixer: {n!r} is a channel mixer; sequence mixers: "
                                     f"{', '.join(reg.names('sequence_mixers'))}")
        for n in cfg.channels:
            if reg.mixer(n).kind != "channel_mixers":
                raise ZooConfigError(f"model.channel: {n!r} is a sequence mixer; channel mixers: "
                                     f"{', '.join(reg.names('channel_mixers'))}")
        seq_args = mixer_kwargs(reg, cfg.mixers, cfg.mixer_args, "model.mixer_args")
        ch_args = mixer_kwargs(reg, cfg.channels, cfg.channel_args, "model.channel_args")
        self.blocks = nn.ModuleList(
            Block(
                reg.build_mixer(m, cfg.d_model, causal=cfg.causal, position=cfg.position, **seq_args[m]),
                reg.build_mixer(c, cfg.d_model, **ch_args[c]),
                cfg,
            )
            for m, c in zip(cfg.mixers, cfg.channels, strict=True)
        )
        if cfg.causal and not cfg.allow_causal_leak:
            for i, block in enumerate(self.blocks):
                parts = (("mixer", cfg.mixers[i], block.mixer), ("channel", cfg.channels[i], block.channel))
                for slot, name, part in parts:
                    why = getattr(part, "causal_leak", None)
                    if why:
                        raise ZooConfigError(
                            f"model.{slot} {name!r} (layer {i}) is not strictly causal: {why}. A causal model "
                            "refuses it; set model.allow_causal_leak: true to use it anyway"
                        )
        self.norm = make_norm(cfg.norm, cfg.d_model) if cfg.norm_position == "pre" else nn.Identity()
        if cfg.head == "lm":
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            if cfg.tie_weights:
                self.head.weight = self.embed.weight
        elif cfg.head == "reconstruct":
            self.head = ReconstructHead(cfg.d_model, cfg.vocab_size, cfg.max_len, cfg.norm)
        else:
            self.head = nn.Linear(cfg.d_model, cfg.n_classes)
        # one mechanism for auxiliary outputs: any module (at any depth) with an `aux_losses` or
        # `aux_metrics` dict, found once here, named by its layer
        self._aux_modules = [
            (f"layer{name.split('.')[1]}" if name.startswith("blocks.") else name or "model", m)
            for name, m in self.named_modules()
            if isinstance(getattr(m, "aux_losses", None), dict) or isinstance(getattr(m, "aux_metrics", None), dict)
        ]

    # -- forward ---------------------------------------------------------------------------
    def embed_tokens(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        x = self.embed(tokens)  # (B, T, d)
        if self.pos is not None:
            if start + tokens.shape[1] > self.cfg.max_len:
                raise ZooConfigError(
                    f"length {start + tokens.shape[1]} exceeds model.max_len={self.cfg.max_len}, "
                    f"the size of the {self.cfg.position} position table"
                )
            x = x + self.pos(start, tokens.shape[1])
        return self.drop(x)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(tokens)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # (B, T, d)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> logits (B, T, vocab) for ``lm`` and ``reconstruct``, (B, n_classes)
        for ``classify``."""
        h = self.hidden(tokens)
        if self.cfg.head == "lm":
            return self.head(h)
        if self.cfg.head == "reconstruct":
            if tokens.shape[1] > self.cfg.max_len:
                raise ZooConfigError(f"length {tokens.shape[1]} exceeds model.max_len={self.cfg.max_len}, the size of "
                                     "the reconstruct head's position table")
            return self.head(h[:, -1], tokens.shape[1])
        pooled = {"mean": lambda: h.mean(1), "last": lambda: h[:, -1], "first": lambda: h[:, 0]}
        return self.head(pooled[self.cfg.pool]())

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Auxiliary losses of the last forward, summed by name over the layers."""
        total: dict[str, torch.Tensor] = {}
        for _, m in self._aux_modules:
            for name, value in getattr(m, "aux_losses", {}).items():
                total[name] = total[name] + value if name in total else value
        return total

    def aux_metrics(self) -> dict[str, torch.Tensor]:
        """Detached diagnostics of the last forward (e.g. MoE utilisation), named by layer."""
        return {f"{where}/{name}": value for where, m in self._aux_modules
                for name, value in getattr(m, "aux_metrics", {}).items()}

    # -- decoding ------------------------------------------------------------------------
    def init_state(self, batch: int) -> list[Any]:
        if self.cfg.head != "lm":
            raise ZooConfigError(f"cannot decode: model.head is {self.cfg.head!r}; decoding gives next-token logits "
                                 "and needs head 'lm'")
        missing = [type(b.mixer).__name__ for b in self.blocks if not hasattr(b.mixer, "step")]
        if missing:
            raise ZooConfigError(f"cannot decode: {', '.join(sorted(set(missing)))} has no step()")
        return [{"pos": 0}] + [b.init_state(batch) for b in self.blocks]

    def step(self, token_t: torch.Tensor, state: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        """One token per sequence, (B,) -> next-token logits (B, vocab); equals ``forward``."""
        pos = state[0]["pos"]
        x = self.embed_tokens(token_t[:, None], start=pos)[:, 0]
        new = [{"pos": pos + 1}]
        for block, s in zip(self.blocks, state[1:], strict=True):
            x, s = block.step(x, s)
            new.append(s)
        return self.head(self.norm(x)), new

    def decode(self, tokens: torch.Tensor, state: list[Any] | None = None) -> tuple[torch.Tensor, list[Any]]:
        """``step`` through ``tokens`` (B, T) from ``state`` (fresh when None): the logits (B, T,
        vocab) and the state after the last token. For a fresh state this equals ``forward``."""
        state = self.init_state(tokens.shape[0]) if state is None else state
        logits = []
        for t in range(tokens.shape[1]):
            out, state = self.step(tokens[:, t], state)
            logits.append(out)
        return torch.stack(logits, 1), state

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def resolve_position(cfg: ModelConfig, registry: Registry | None = None) -> str:
    """``cfg.position``, with ``auto`` replaced by the mixers' registry default_position."""
    if cfg.position != "auto":
        return cfg.position
    reg = registry or default_registry()
    wanted = [reg.mixer(n).default_position for n in dict.fromkeys(cfg.mixers)
              if reg.mixer(n).kind == "sequence_mixers"]
    return next((p for p in wanted if p != "none"), "none")


def build_model(config: Config | ModelConfig | dict, registry: Registry | None = None) -> ZooModel:
    """A model from a :class:`Config`, a :class:`ModelConfig` or a dict of model keys."""
    if isinstance(config, Config):
        config = config.model
    return ZooModel(from_dict(ModelConfig, config, where="model"), registry)
