"""Mixture of experts: routing, capacity, losses, equivalence with a dense FFN, balancing in training."""

import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.channel.moe import load_balancing_loss, router_z_loss

D = 16


def moe(**kw):
    return zoo.build_mixer("moe", D, **{"hidden": 32, **kw})


@pytest.mark.parametrize("expert,dense", [("swiglu", "swiglu"), ("mlp", "mlp")])
def test_one_expert_top1_is_a_dense_ffn(expert, dense):
    m = moe(n_experts=1, top_k=1, expert=expert).double()
    ffn = zoo.build_mixer(dense, D, hidden=32, bias=False).double()
    with torch.no_grad():
        first = ffn.gate_up if dense == "swiglu" else ffn.up
        first.weight.copy_(m.w_in[0])
        ffn.down.weight.copy_(m.w_out[0])
    x = torch.randn(3, 7, D, dtype=torch.float64)
    torch.testing.assert_close(m(x), ffn(x))


def test_output_is_the_weighted_sum_of_the_chosen_experts():
    m = moe(n_experts=4, top_k=2).double()
    x = torch.randn(11, D, dtype=torch.float64)
    w, e = m.route(m.router(x))
    expected = torch.stack([
        sum(w[t, j] * m._expert(int(e[t, j]), x[t : t + 1])[0] for j in range(2)) for t in range(11)
    ])
    torch.testing.assert_close(m(x), expected)
    torch.testing.assert_close(w.sum(-1), torch.ones(11, dtype=torch.float64))
    raw = moe(n_experts=4, top_k=2, renormalize=False).double()
    raw.load_state_dict(m.state_dict())
    w_raw, _ = raw.route(raw.router(x))
    torch.testing.assert_close(w_raw, m.router(x).softmax(-1).topk(2).values)


@pytest.mark.parametrize("expert", ["swiglu", "mlp"])
def test_fused_expert_backward_equals_autograd(expert):
    """The layer's in-place weight gradients against autograd through the per-expert
    reference (_expert), an expert without tokens included (its gradient is exactly zero)."""
    from zoo.channel.moe import _Experts

    m = moe(n_experts=4, top_k=1, expert=expert).double()
    xs = torch.randn(9, D, dtype=torch.float64, requires_grad=True)
    sizes = [4, 0, 2, 3]
    g = torch.randn(9, D, dtype=torch.float64)
    ys = _Experts.apply(xs, m.w_in, m.w_out, sizes, expert)
    ref = torch.cat([m._expert(i, part) for i, part in enumerate(xs.split(sizes)) if part.shape[0]])
    torch.testing.assert_close(ys, ref)
    got = torch.autograd.grad(ys, (xs, m.w_in, m.w_out), g)
    want = torch.autograd.grad(ref, (xs, m.w_in, m.w_out), g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert got[1][1].abs().max() == 0 and got[2][1].abs().max() == 0


def test_capacity_drops_by_priority_on_a_hand_built_routing():
    """4 tokens, 2 experts, top-1, capacity factor 1 -> 2 slots per expert.
    Tokens 0, 1, 2 choose expert 0 and token 3 expert 1: token 2 (last in line) is dropped."""
    m = moe(n_experts=2, top_k=1, capacity_factor=1.0, capacity_rule="batch").double()
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0], m.router.weight[1, 1] = 1.0, 1.0
    x = torch.zeros(4, D, dtype=torch.float64)
    x[:3, 0] = 5.0
    x[3, 1] = 5.0
    assert m.capacity(4) == 2
    y = m(x)
    assert torch.equal(m.tokens_per_expert, torch.tensor([3, 1]))
    assert y[2].abs().max() == 0  # dropped: the block's residual carries it unchanged
    for t in (0, 1, 3):
        assert y[t].abs().max() > 0
    assert m.aux_metrics["moe_dropped_assignments"].item() == pytest.approx(0.25)
    assert m.aux_metrics["moe_dropped_tokens"].item() == pytest.approx(0.25)
    block = zoo.build_model({"mixer": "softmax", "channel": "moe", "d_model": D, "n_layers": 1,
                             "mixer_args": {"n_heads": 2}, "channel_args": {"capacity_factor": 1.0, "hidden": 32}})
    # the causal rule is the default: a causal model takes it; the batch rule only when asked
    with pytest.raises(zoo.ZooConfigError, match=r"moe.*not strictly causal.*capacity_rule 'batch'.*allow_causal_leak"):
        zoo.build_model({"mixer": "softmax", "channel": "moe", "d_model": D, "n_layers": 1, "mixer_args": {"n_heads": 2},
                         "channel_args": {"capacity_factor": 1.0, "hidden": 32, "capacity_rule": "batch"}})
    assert block(torch.randint(0, 256, (2, 9))).shape == (2, 9, 256)


def test_second_choices_yield_to_first_choices():
    """top-2, capacity 1 per expert: every token's first choice is served before any second."""
    m = moe(n_experts=2, top_k=2, capacity_factor=0.5, capacity_rule="batch").double()  # ceil(0.5*2*2/2) = 1 slot
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0], m.router.weight[1, 1] = 1.0, 1.0
    x = torch.zeros(2, D, dtype=torch.float64)
    x[0, 0], x[1, 1] = 3.0, 3.0  # token 0 prefers expert 0, token 1 expert 1
    y = m(x)
    w, _ = m.route(m.router(x))
    torch.testing.assert_close(y[0], w[0, 0] * m._expert(0, x[:1])[0])
    torch.testing.assert_close(y[1], w[1, 0] * m._expert(1, x[1:])[0])


def test_causal_capacity_by_hand():
    """Rule causal, top-1, 2 experts, capacity factor 1: position t may use ceil((t + 1) / 2)
    slots of an expert. Positions 0, 1, 2, 3 all choose expert 0: ranks 0, 1, 2, 3 against
    capacities 1, 1, 2, 2, so 0 is kept, 1 and 2 and 3 are dropped; a fifth (capacity 3, rank 4)
    is dropped too, and a sequence of its own is unaffected by the first."""
    m = moe(n_experts=2, top_k=1, capacity_factor=1.0).double()
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0], m.router.weight[1, 1] = 1.0, 1.0
    x = torch.zeros(2, 5, D, dtype=torch.float64)
    x[0, :, 0] = 5.0  # sequence 0: all expert 0
    x[1, ::2, 0], x[1, 1::2, 1] = 5.0, 5.0  # sequence 1: alternating, never over capacity
    y = m(x)
    assert [bool(y[0, t].abs().max() > 0) for t in range(5)] == [True, False, False, False, False]
    assert all(y[1, t].abs().max() > 0 for t in range(5))


@pytest.mark.parametrize("rule_ok", [("causal", True), ("batch", False)])
def test_capacity_rule_causality_batch_rows_and_decoding(rule_ok):
    """Rule causal: later positions never change earlier outputs, batch rows do not interact,
    and decoding equals the forward. Rule batch (Switch): later tokens evict earlier ones."""
    rule, causal = rule_ok
    m = moe(n_experts=4, top_k=2, capacity_factor=1.0, capacity_rule=rule).double()
    x = torch.randn(3, 24, D, dtype=torch.float64)
    y = m(x)
    x2 = x.clone()
    x2[:, 12:] = 3 * torch.randn_like(x2[:, 12:])
    past = (m(x2)[:, :12] - y[:, :12]).abs().max().item()
    rows = (m(x[:1]) - y[:1]).abs().max().item()
    if causal:  # grouped GEMMs of other sizes round differently: equal to fp64 precision
        assert past < 1e-12 and rows < 1e-12, (past, rows)
        assert m.causal_leak is None
        ys, _ = zoo.decode(m, x)
        torch.testing.assert_close(ys, y, rtol=1e-12, atol=1e-12)
        assert m.aux_metrics["moe_dropped_assignments"] >= 0
    else:
        assert past > 1e-3 and rows > 1e-3, (past, rows)
        assert "evict" in m.causal_leak
        with pytest.raises(zoo.ZooConfigError, match="cannot decode"):
            m.step(x[:, 0], m.init_state(3))


def test_model_decodes_with_a_causal_capacity_moe():
    model = zoo.build_model({"mixer": "softmax", "channel": "moe", "d_model": D, "n_layers": 2,
                             "mixer_args": {"n_heads": 2},
                             "channel_args": {"capacity_factor": 0.5, "hidden": 32, "n_experts": 4}}).double().eval()
    tokens = torch.randint(0, 256, (2, 20))
    full = model(tokens)
    torch.testing.assert_close(model.decode(tokens)[0], full, rtol=1e-10, atol=1e-10)


def test_moe_errors():
    with pytest.raises(zoo.ZooConfigError, match=r"unknown capacity_rule of moe 'causl'.*did you mean 'causal'"):
        moe(capacity_rule="causl")
    with pytest.raises(zoo.ZooConfigError, match=r"moe needs d_model >= 1, n_experts >= 1 and hidden >= 0.*hidden=-1"):
        moe(hidden=-1)


def test_balance_loss_minimum_maximum_and_gradient():
    E, N = 4, 64
    uniform = torch.zeros(N, E)  # equal probabilities; top-2 ties broken evenly below
    uniform[torch.arange(N), torch.arange(N) % E] += 1e-4
    uniform[torch.arange(N), (torch.arange(N) + 1) % E] += 1e-4
    assert load_balancing_loss(uniform, 2).item() == pytest.approx(2.0, rel=1e-3)  # the minimum, k
    collapsed = torch.zeros(N, E)
    collapsed[:, 0] = 30.0
    assert load_balancing_loss(collapsed, 1).item() == pytest.approx(E, rel=1e-3)  # the maximum, E
    m = moe(n_experts=E, top_k=2)
    m(torch.randn(N, D))
    m.aux_losses["moe_balance"].backward()
    assert m.router.weight.grad.abs().sum() > 0
    assert m.w_in.grad is None  # the loss reaches the router only


def test_z_loss_is_mean_squared_logsumexp():
    logits = torch.randn(10, 4)
    assert router_z_loss(logits).item() == pytest.approx(logits.logsumexp(-1).pow(2).mean().item())


@pytest.mark.peers
def test_balance_loss_equals_transformers():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    logits = torch.randn(200, 8) * 3
    for k in (1, 2, 3):
        ours = load_balancing_loss(logits, k)
        theirs = mixtral.load_balancing_loss_func((logits,), num_experts=8, top_k=k)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    m = moe(n_experts=8, top_k=2, balance_weight=1.0)
    x = torch.randn(5, 13, D)
    m(x)
    theirs = mixtral.load_balancing_loss_func((m.router(x.reshape(-1, D)),), num_experts=8, top_k=2)
    torch.testing.assert_close(m.aux_losses["moe_balance"], theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.peers
def test_matches_mixtral_sparse_moe_block():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    from transformers import MixtralConfig
    cfg = MixtralConfig(hidden_size=D, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    peer = mixtral.MixtralSparseMoeBlock(cfg).double()
    for p in peer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours = moe(n_experts=4, top_k=2, hidden=24).double()
    with torch.no_grad():
        ours.router.weight.copy_(peer.gate.weight)
        ours.w_in.copy_(peer.experts.gate_up_proj)
        ours.w_out.copy_(peer.experts.down_proj)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    torch.testing.assert_close(ours(x), peer(x))


def test_aux_losses_reach_the_model_loss():
    model = zoo.build_model({"mixer": "softmax", "channel": ["moe", "mlp"], "n_layers": 4, "d_model": D,
                             "mixer_args": {"n_heads": 2}, "channel_args": {"moe": {"hidden": 32}}})
    model(torch.randint(0, 256, (2, 12)))
    aux = model.aux_losses()
    assert set(aux) == {"moe_balance", "moe_z"}
    layers = [b.channel for b in model.blocks if hasattr(b.channel, "aux_losses")]
    torch.testing.assert_close(aux["moe_balance"], layers[0].aux_losses["moe_balance"] + layers[1].aux_losses["moe_balance"])
    assert set(model.aux_metrics()) >= {"layer0/moe_load_entropy", "layer2/moe_dropped_tokens"}


def _train(balance_weight: float, steps: int = 150) -> float:
    """A seeded toy regression with top-1 Switch routing over 8 experts, started from a router
    that slightly prefers expert 0 (as a random init often does for some expert). Returns the
    normalised entropy of the expert loads at the end (1 = even, 0 = one expert takes all)."""
    torch.manual_seed(0)
    m = moe(n_experts=8, top_k=1, hidden=16, renormalize=False, balance_weight=balance_weight, z_weight=0.0)
    with torch.no_grad():
        m.router.weight[0, 0] += 1.0  # inputs carry a constant 1 in feature 0
    target = torch.nn.Sequential(torch.nn.Linear(D, 32), torch.nn.Tanh(), torch.nn.Linear(32, D))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)

    def batch(n):
        x = torch.randn(n, D)
        x[:, 0] = 1.0
        return x

    for _ in range(steps):
        x = batch(256)
        with torch.no_grad():
            y = target(x)
        loss = F.mse_loss(m(x), y) + sum(m.aux_losses.values(), torch.tensor(0.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    m(batch(2048))
    return m.aux_metrics["moe_load_entropy"].item()


def test_balancing_loss_prevents_collapse():
    with_loss, without = _train(0.01), _train(0.0)  # 0.01: the default balance_weight
    assert with_loss > 0.9, f"balanced utilisation entropy {with_loss:.3f}"
    assert without < 0.5, f"without the loss: {without:.3f} (with it: {with_loss:.3f})"


def test_bad_moe_config():
    with pytest.raises(zoo.ZooConfigError, match=r"1 <= top_k <= n_experts, got top_k=3, n_experts=2"):
        moe(n_experts=2, top_k=3)
    with pytest.raises(zoo.ZooConfigError, match=r"unknown expert kind of moe 'glu'.*Allowed: mlp, swiglu"):
        moe(expert="glu")


def test_entropy_is_normalised():
    m = moe(n_experts=4, top_k=1)
    m(torch.randn(400, D))
    assert 0.0 <= m.aux_metrics["moe_load_entropy"].item() <= 1.0 + 1e-6
    assert math.isclose(m.tokens_per_expert.sum().item(), 400)
