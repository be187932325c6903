"""Why does the zoo's softmax stall on MQAR where a plain transformer does not? An independent check.

A two-layer causal transformer written here from PyTorch parts (learned positions, pre-LN, GELU
MLP, untied head with bias, PyTorch's default initialisation) and the zoo's own model are trained
on the same data (the zoo's MQAR, as Zoology generates it: vocab 128, seq_len 64, 4 pairs, fresh
batches of 64), with the
same loop and either recipe, and their validation accuracy printed every 250 steps.

    python bench/probe_mqar_init.py --model plain --seed 0          # the independent transformer
    python bench/probe_mqar_init.py --model zoo --seed 0            # the zoo's model, its own init
    python bench/probe_mqar_init.py --model zoo --embed-std 0.02 --tied --seed 0   # the zoo's init before
    python bench/probe_mqar_init.py --model zoo --task '{"reveal_answers": true, "filler": "zero", "power_a": 1}'
                                                                    # the zoo's MQAR format before
    python bench/probe_mqar_init.py --model zoo-from-plain --seed 0 # the zoo's model, plain's initial weights
    python bench/probe_mqar_init.py --model zoo-from-plain --no-attention-bias --seed 0

With the same weights the two models compute the same function (``--check`` loads the plain
weights into the zoo model and prints the largest output difference: the head bias alone). See
docs/findings.md for what these runs showed.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo

V, T, D, H = 128, 64, 128, 2


class PlainBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x):  # (B, T, D)
        B = x.shape[0]
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        x = x + self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.blocks = nn.Sequential(PlainBlock(), PlainBlock())
        self.ln, self.head = nn.LayerNorm(D), nn.Linear(D, V)

    def forward(self, x):
        return self.head(self.ln(self.blocks(self.emb(x) + self.pos.weight)))


def zoo_model(attention_bias: bool, tied: bool = False, position: str = "learned", embed_std: float = 1.0) -> nn.Module:
    return zoo.build_model({"vocab_size": V, "d_model": D, "n_layers": 2, "position": position, "max_len": T,
                            "mixer_args": {"n_heads": H, "bias": attention_bias}, "tie_weights": tied,
                            "embed_std": embed_std})


def plain_weights_into_zoo(p: Plain, attention_bias: bool) -> nn.Module:
    z = zoo_model(attention_bias, tied=False)
    sd = {"embed.weight": p.emb.weight, "pos.table.weight": p.pos.weight, "norm.weight": p.ln.weight,
          "norm.bias": p.ln.bias, "head.weight": p.head.weight}
    for i, b in enumerate(p.blocks):
        sd.update({f"blocks.{i}.norm1.weight": b.ln1.weight, f"blocks.{i}.norm1.bias": b.ln1.bias,
                   f"blocks.{i}.norm2.weight": b.ln2.weight, f"blocks.{i}.norm2.bias": b.ln2.bias,
                   f"blocks.{i}.mixer.qkv.weight": b.qkv.weight, f"blocks.{i}.mixer.out.weight": b.o.weight,
                   f"blocks.{i}.channel.up.weight": b.mlp[0].weight, f"blocks.{i}.channel.up.bias": b.mlp[0].bias,
                   f"blocks.{i}.channel.down.weight": b.mlp[2].weight, f"blocks.{i}.channel.down.bias": b.mlp[2].bias})
        if attention_bias:
            sd.update({f"blocks.{i}.mixer.qkv.bias": b.qkv.bias, f"blocks.{i}.mixer.out.bias": b.o.bias})
    z.load_state_dict(sd)
    return z


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["plain", "zoo", "zoo-from-plain"], default="plain")
    ap.add_argument("--no-attention-bias", action="store_true", help="zoo-from-plain without q/k/v/out biases")
    ap.add_argument("--embed-std", type=float, default=1.0,
                    help="zoo: model.embed_std, the token and position embeddings' initial std (1: the zoo's default; 0.02: GPT-2's, the zoo's before)")
    ap.add_argument("--tied", action="store_true", help="zoo: tie the head to the embeddings (the zoo's default before)")
    ap.add_argument("--recipe", choices=["zoo", "plain"], default="zoo",
                    help="zoo: AdamW (0.9, 0.95), decay on matrices, warm-up 100 + cosine, clip 1; plain: AdamW defaults")
    ap.add_argument("--task", type=json.loads, default={},
                    help='more MQAR arguments as JSON, e.g. \'{"reveal_answers": true, "filler": "zero"}\' (the old format)')
    ap.add_argument("--position", default="learned", help="zoo: the positional scheme (learned, rope, alibi, ...)")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="compare the two models' outputs on shared weights and exit")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.check:
        p = Plain()
        z = plain_weights_into_zoo(p, attention_bias=True)
        x = torch.randint(0, V, (2, T))
        with torch.no_grad():
            print("max |plain - zoo| on shared weights:", (p(x) - z(x)).abs().max().item(),
                  "(plain's head bias:", p.head.bias.abs().max().item(), ")")
        return
    task = zoo.default_registry().build_task("mqar", vocab=V, seq_len=T, n_pairs=4, train_size=0, test_size=1000,
                                             batch_size=64, **args.task)
    task.setup()
    def zoo_scaled():
        z = zoo_model(False, tied=args.tied, position=args.position, embed_std=args.embed_std)
        return z

    model = {"plain": Plain, "zoo": zoo_scaled,
             "zoo-from-plain": lambda: plain_weights_into_zoo(Plain(), not args.no_attention_bias)}[args.model]()
    params = list(model.parameters())
    if args.recipe == "plain":
        opt, sched, clip = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.1), None, 0.0
    else:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
        warm, n = 100, args.steps

        def factor(s: int) -> float:
            if s < warm:
                return (s + 1) / warm
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, n - warm))))

        sched, clip = torch.optim.lr_scheduler.LambdaLR(opt, factor), 1.0
    xv, yv = task.data["val"].tensors
    start = time.time()
    for step in range(args.steps):
        x, y = task.train_batch(step)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        if sched:
            sched.step()
        if (step + 1) % 250 == 0:
            with torch.no_grad():
                pred, scored = model(xv).argmax(-1), yv != -100
                acc = ((pred == yv) & scored).sum().item() / scored.sum().item()
            print(f"step {step + 1}  val accuracy {acc:.3f}  ({time.time() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
