"""Mixture-of-experts FFN with top-k routing and load balancing (Shazeer et al. 2017; Fedus et
al. 2021, Switch Transformer; Zoph et al. 2022, ST-MoE).

    probs = softmax(router(x));  (w, e) = top-k(probs);  y = sum_k w_k * expert_{e_k}(x)

- Experts are SwiGLU or GELU MLPs without biases, stored stacked: ``w_in`` (E, 2h or h, d) and
  ``w_out`` (E, d, h), the layout of Hugging Face's ``MixtralExperts`` (gate rows, then up rows).
- ``renormalize``: the k weights are divided by their sum (Mixtral); otherwise they are the raw
  router probabilities (Switch).
- ``capacity_factor`` c > 0 limits what each expert serves; ``capacity_factor = 0`` is dropless.
  A dropped assignment contributes nothing, so a token whose every assignment is dropped passes
  through the block's residual unchanged. Two rules (``capacity_rule``):
    causal  (default) per sequence, in position order, with a running capacity: the assignment
            of position t to expert e is kept when fewer than ceil(c * k * (t + 1) / E) earlier
            positions of the same sequence chose e. Each position depends only on itself and
            the positions before it in its own sequence, so it is causal on values, batch rows
            do not interact, a prefix gets what the full forward gives it, and decoding (a
            count per expert as state) equals the forward. Input (..., T, d): the last-but-one
            dimension is the sequence (a 2-d input is one sequence).
    batch   Switch Transformer's: each expert takes at most ceil(c * k * N / E) of the N tokens'
            assignments in the whole batch, every first choice before any second choice, then
            by position. A later token can evict an earlier one's assignment and batch rows
            interact, so it is not causal (``causal_leak``): a causal model takes it only with
            ``allow_causal_leak``.
- Auxiliary losses (``self.aux_losses``, added to the training loss by the harness):
  ``moe_balance`` = balance_weight * E * sum_i f_i P_i, with f_i the fraction of the N tokens'
  assignments that chose expert i (before dropping; sums to k) and P_i the mean router
  probability of expert i, equal to Hugging Face's ``load_balancing_loss_func``; its minimum k
  is reached by uniform routing; ``moe_z`` = z_weight * mean(logsumexp(router logits)^2).
- Utilisation (``self.aux_metrics``, detached): the normalised entropy of the expert loads
  (1 = perfectly even), the largest load over the mean load, and the fraction of assignments
  and of tokens dropped. ``self.tokens_per_expert`` holds the last counts.
No state outlives a forward, so DDP needs nothing special: each rank balances its own tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from zoo.errors import ZooConfigError, unknown

EXPERTS = ("swiglu", "mlp")
CAPACITY_RULES = ("causal", "batch")


def _wide(t: torch.Tensor) -> torch.Tensor:
    """Router arithmetic in at least fp32 (bf16/fp16 logits are widened, fp64 kept)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def balance_loss(logits: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i P_i from router logits (N, E) and the assignments per expert (E,)."""
    probs = _wide(logits).softmax(-1)
    f = counts.to(probs.dtype) / probs.shape[0]
    return probs.shape[-1] * (f * probs.mean(0)).sum()


def load_balancing_loss(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The Switch loss in Mixtral's top-k form, from router logits alone."""
    chosen = _wide(logits).topk(top_k, dim=-1).indices
    return balance_loss(logits, torch.bincount(chosen.flatten(), minlength=logits.shape[-1]))


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    return _wide(logits).logsumexp(-1).pow(2).mean()


class MoE(nn.Module):
    def __init__(self, d_model: int, *, n_experts: int = 8, top_k: int = 2, hidden: int = 0,
                 expert: str = "swiglu", renormalize: bool = True, capacity_factor: float = 0.0,
                 capacity_rule: str = "causal", balance_weight: float = 0.01, z_weight: float = 0.001):
        super().__init__()
        if expert not in EXPERTS:
            raise unknown("expert kind of moe", expert, EXPERTS)
        if capacity_rule not in CAPACITY_RULES:
            raise unknown("capacity_rule of moe", capacity_rule, CAPACITY_RULES)
        if n_experts < 1 or hidden < 0 or d_model < 1:
            raise ZooConfigError(f"moe needs d_model >= 1, n_experts >= 1 and hidden >= 0 (0: 4 d_model); got "
                                 f"d_model={d_model}, n_experts={n_experts}, hidden={hidden}")
        if not 1 <= top_k <= n_experts:
            raise ZooConfigError(
                f"moe needs 1 <= top_k <= n_experts, got top_k={top_k}, n_experts={n_experts}"
            )
        if capacity_factor < 0 or balance_weight < 0 or z_weight < 0:
            raise ZooConfigError("moe capacity_factor, balance_weight and z_weight must be >= 0")
        hidden = hidden or 4 * d_model
        self.n_experts, self.top_k, self.hidden, self.expert = n_experts, top_k, hidden, expert
        self.renormalize, self.capacity_factor, self.capacity_rule = renormalize, capacity_factor, capacity_rule
        self.balance_weight, self.z_weight = balance_weight, z_weight
        self.router = nn.Linear(d_model, n_experts, bias=False)
        rows = 2 * hidden if expert == "swiglu" else hidden
        self.w_in = nn.Parameter(torch.empty(n_experts, rows, d_model))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        for w in (self.w_in, self.w_out):  # nn.Linear's default init, per expert
            bound = 1 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.aux_metrics: dict[str, torch.Tensor] = {}
        self.tokens_per_expert = torch.zeros(n_experts, dtype=torch.long)

    def capacity(self, n_tokens: int) -> int:
        """Assignments an expert may serve among ``n_tokens`` tokens (of the batch for rule
        ``batch``; of a sequence's first ``n_tokens`` positions for rule ``causal``)."""
        return math.ceil(self.capacity_factor * self.top_k * n_tokens / self.n_experts)

    @property
    def causal_leak(self) -> str | None:
        if self.capacity_factor > 0 and self.capacity_rule == "batch":
            return ("capacity_rule 'batch' fills each expert's capacity over the whole batch, first choices "
                    "before second choices, so a later token can evict an earlier token's assignment and "
                    "batch rows interact; capacity_rule 'causal' fills it in position order per sequence")
        return None

    def route(self, logits: torch.Tensor):
        """Router logits (N, E) -> weights (N, k), experts (N, k)."""
        probs = _wide(logits).softmax(-1)
        w, e = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            w = w / w.sum(-1, keepdim=True)
        return w, e

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d) -> (..., d)
        return self._forward(x)[0]

    def _forward(self, x: torch.Tensor, chosen: torch.Tensor | None = None, start: int = 0):
        """The forward; for rule ``causal`` also from a decode state: ``chosen`` (B, E) counts
        how often each expert was chosen at the ``start`` positions before ``x``. Returns the
        output and the counts after ``x`` (or None)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        N, E, k = x2.shape[0], self.n_experts, self.top_k
        if N == 0:
            self._account(x2.new_zeros(0, E), torch.zeros(E, dtype=torch.long, device=x.device),
                          torch.zeros(E, dtype=torch.long, device=x.device), x2.new_zeros(0, dtype=torch.long), 0)
            return x * self.router.weight.sum() * 0, chosen
        logits = self.router(x2)  # (N, E)
        w, e = self.route(logits)
        keep, after = None, None
        if self.capacity_factor > 0 and self.capacity_rule == "causal":
            keep, after = self._causal_keep(e, shape, chosen, start)
        # Assignments in priority order (slot-major: all first choices, then second, ...),
        # then grouped by expert with a stable sort, so each group keeps that priority.
        flat_e = e.t().reshape(-1)  # (k*N,)
        counts = torch.bincount(flat_e, minlength=E)
        if keep is not None:  # drop first, then group what is kept
            kept_flat = keep.t().reshape(-1)
            idx = kept_flat.nonzero().squeeze(1)
            order = idx[flat_e[idx].argsort(stable=True)]
            kept = torch.bincount(flat_e[idx], minlength=E)
        else:
            order = flat_e.argsort(stable=True)
            kept = counts
        tokens = order % N  # token of each sorted assignment
        weights = w.t().reshape(-1)[order].to(x.dtype)
        if self.capacity_factor > 0 and self.capacity_rule == "batch":
            cap = self.capacity(N)
            start_of = torch.cumsum(counts, 0) - counts
            rank = torch.arange(k * N, device=x.device) - start_of.repeat_interleave(counts)
            keep_b = rank < cap
            tokens, weights = tokens[keep_b], weights[keep_b]
            kept = counts.clamp(max=cap)
        xs = x2.index_select(0, tokens)  # (M, d), grouped by expert
        # Indexing w_in[i] per expert made autograd zero-fill a whole (E, 2h, d) gradient for
        # every expert and add them up (86 % of the layer's time at 256 tokens); unbinding once
        # still stacks (copies) the experts' gradients. _Experts writes them in place.
        sizes = kept.tolist()
        if torch.is_autocast_enabled(x.device.type) or not (xs.dtype == self.w_in.dtype == self.w_out.dtype):
            w_in, w_out = self.w_in.unbind(0), self.w_out.unbind(0)
            outs = [self._expert(i, xe, (w_in[i], w_out[i]))
                    for i, (xe, n) in enumerate(zip(xs.split(sizes), sizes, strict=True)) if n]
            ys = torch.cat(outs) if outs else xs[:0]
        else:  # the experts' weight gradients written in place into one stacked gradient each
            ys = _Experts.apply(xs, self.w_in, self.w_out, sizes, self.expert)
        ys = ys * weights[:, None]
        y = torch.zeros_like(x2).index_add_(0, tokens, ys)
        self._account(logits, counts, kept, tokens, N)
        return y.view(shape), after

    def flops(self, batch: int, length: int) -> int | None:
        """Forward FLOPs when dropless: the router and k expert FFNs per token. With a capacity
        the count depends on what the routing drops: None (not counted)."""
        if self.capacity_factor > 0:
            return None
        d, rows = self.w_in.shape[2], self.w_in.shape[1]
        N = batch * length
        return 2 * N * d * self.n_experts + 2 * N * self.top_k * (d * rows + self.hidden * d)

    def _causal_keep(self, e: torch.Tensor, shape, chosen, start: int):
        """Rule ``causal``: keep (N, k) bool and the per-sequence counts after these positions."""
        T = shape[-2] if len(shape) >= 3 else shape[0]
        S = e.shape[0] // T  # sequences
        E, k = self.n_experts, self.top_k
        e3 = e.view(S, T, k)
        onehot = torch.zeros(S, T, E, dtype=torch.long, device=e.device).scatter_(-1, e3, 1)  # top-k: distinct
        before = onehot.cumsum(1) - onehot  # (S, T, E): choices at earlier positions of the sequence
        if chosen is not None:
            before = before + chosen[:, None, :]
        rank = before.gather(-1, e3)  # (S, T, k)
        pos = start + torch.arange(T, device=e.device)
        cap = torch.ceil(self.capacity_factor * k * (pos + 1) / E).long()  # running capacity (T,)
        keep = (rank < cap[None, :, None]).view(-1, k)
        after = before[:, -1] + onehot[:, -1] if T else chosen
        return keep, after

    # -- decoding: rule ``causal`` counts each expert's choices so far ----------------------------
    def init_state(self, batch: int, device=None, dtype=None) -> dict:
        device = device or self.router.weight.device
        return {"chosen": torch.zeros(batch, self.n_experts, dtype=torch.long, device=device), "length": 0}

    def step(self, x_t: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict]:
        """x_t (B, d) -> (B, d); equals the forward's position ``state['length']``."""
        if self.capacity_factor > 0 and self.capacity_rule == "batch":
            raise ZooConfigError("moe with capacity_rule 'batch' cannot decode: its capacity is shared by the "
                                 "whole batch; use capacity_rule 'causal' (or capacity_factor 0)")
        y, chosen = self._forward(x_t[:, None], state["chosen"], state["length"])
        if chosen is None:  # dropless: nothing to count
            chosen = state["chosen"]
        return y[:, 0], {"chosen": chosen, "length": state["length"] + 1}

    def _expert(self, i: int, x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Expert i on x; ``weights``: its (w_in, w_out) when the caller has unbound them already."""
        w_in, w_out = weights or (self.w_in[i], self.w_out[i])
        return F.linear(_Experts.act(F.linear(x, w_in), self.expert), w_out)

    def _account(self, logits, counts, kept, tokens, N):
        aux = {}
        if self.balance_weight:
            aux["moe_balance"] = self.balance_weight * balance_loss(logits, counts)
        if self.z_weight:
            aux["moe_z"] = self.z_weight * router_z_loss(logits)
        self.aux_losses = aux
        with torch.no_grad():
            load = counts.float() / counts.sum()
            entropy = -(load * load.clamp_min(1e-12).log()).sum() / max(math.log(self.n_experts), 1e-12)
            served = torch.zeros(N, dtype=torch.bool, device=counts.device)
            served[tokens] = True
            self.aux_metrics = {
                "moe_load_entropy": entropy,
                "moe_max_load": load.max() * self.n_experts,
                "moe_dropped_assignments": 1 - kept.sum() / counts.sum(),
                "moe_dropped_tokens": 1 - served.float().mean(),
            }
            self.tokens_per_expert = counts.detach()

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, top_k={self.top_k}, hidden={self.hidden}, "
                f"expert={self.expert!r}, renormalize={self.renormalize}, "
                f"capacity_factor={self.capacity_factor}, capacity_rule={self.capacity_rule!r}")


class _Experts(torch.autograd.Function):
    """All experts on their groups of tokens, with a backward that writes each expert's weight
    gradients straight into its slice of one (E, rows, d) and (E, d, hidden) gradient: no
    per-expert gradient tensors to stack, no concatenation of the SwiGLU halves' gradients.

    xs (M, d): tokens grouped by expert, ``sizes[i]`` of them for expert i; returns (M, d).
    Saves xs and the experts' first-layer outputs (M, rows); the activation is recomputed."""

    @staticmethod
    def forward(ctx, xs, w_in, w_out, sizes, kind):
        M, rows = xs.shape[0], w_in.shape[1]
        h_all = xs.new_empty(M, rows)
        ys = xs.new_empty(M, w_out.shape[1])
        start = 0
        for i, n in enumerate(sizes):
            if n:
                h = torch.mm(xs[start : start + n], w_in[i].t(), out=h_all[start : start + n])
                torch.mm(_Experts.act(h, kind), w_out[i].t(), out=ys[start : start + n])
            start += n
        ctx.save_for_backward(xs, w_in, w_out, h_all)
        ctx.sizes, ctx.kind = sizes, kind
        return ys

    @staticmethod
    def act(h: torch.Tensor, kind: str) -> torch.Tensor:
        if kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        xs, w_in, w_out, h_all = ctx.saved_tensors
        dx, dw_in, dw_out = torch.empty_like(xs), torch.empty_like(w_in), torch.empty_like(w_out)
        dy = dy.contiguous()
        start = 0
        for i, n in enumerate(ctx.sizes):
            if not n:
                dw_in[i].zero_()
                dw_out[i].zero_()
                continue
            xe, h, g = xs[start : start + n], h_all[start : start + n], dy[start : start + n]
            torch.mm(g.t(), _Experts.act(h, ctx.kind), out=dw_out[i])
            da = g @ w_out[i]  # (n, hidden)
            if ctx.kind == "swiglu":
                gate, up = h.chunk(2, dim=-1)
                sig = torch.sigmoid(gate)
                dh = torch.empty_like(h)
                torch.mul(da, gate * sig, out=dh[:, up.shape[1] :])  # d up = da * silu(gate)
                # d gate = da * up * silu'(gate), silu'(g) = sig(g) (1 + g (1 - sig(g)))
                torch.mul(da * up, sig * (1 + gate * (1 - sig)), out=dh[:, : up.shape[1]])
            else:
                dh = torch.ops.aten.gelu_backward(da, h)
            torch.mm(dh.t(), xe, out=dw_in[i])
            torch.mm(dh, w_in[i], out=dx[start : start + n])
            start += n
        return dx, dw_in, dw_out, None, None
