"""window, lsh, linformer and linear attention: parity with references and with each other."""

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.mixers.linear import CausalChunked
from zoo.mixers.lsh import SELF_SCORE, _ChunkAttention

D, H = 32, 2


def pair(name, **kw):
    """The same mixer with the reference backend and the fast one, sharing weights."""
    ref = zoo.build_mixer(name, D, n_heads=H, backend="reference", **kw).double()
    fast = zoo.build_mixer(name, D, n_heads=H, backend="torch", **kw).double()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def assert_same(a, b, x):
    torch.testing.assert_close(a(x), b(x), rtol=1e-10, atol=1e-10)


# -- window ------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("position", ["none", "rope", "alibi"])
def test_window_covering_the_sequence_is_softmax(causal, position):
    T = 50
    w = zoo.build_mixer("window", D, n_heads=H, causal=causal, position=position, window=T, block=16).double()
    s = zoo.build_mixer("softmax", D, n_heads=H, causal=causal, position=position).double()
    s.load_state_dict(w.state_dict())
    assert_same(w, s, torch.randn(2, T, D, dtype=torch.float64))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name,kw", [
    ("window", {"window": 7, "block": 3}),
    ("window", {"window": 7, "block": 16}),
    ("window", {"window": 4, "dilation": 3, "block": 5}),
    ("window", {"window": 6, "global_tokens": [0, 9], "global_every": 11, "block": 4}),
    ("window", {"window": 1, "global_tokens": [3]}),
    ("window", {"window": 9, "global_every": 5, "position": "alibi", "block": 8}),
    # bigbird: the window with random key blocks
    ("bigbird", {"window": 5, "block": 4, "random_blocks": 2}),
    ("bigbird", {"window": 3, "block": 3, "random_blocks": 1, "global_tokens": [0, 7], "position": "alibi"}),
    ("bigbird", {"window": 8, "block": 4, "random_blocks": 5, "dilation": 2}),
])
def test_blocked_equals_dense_mask(causal, name, kw):
    ref, fast = pair(name, causal=causal, **kw)
    x = torch.randn(2, 45, D, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-10, atol=1e-10)
    g = torch.randn(2, 45, D, dtype=torch.float64)
    (a,) = torch.autograd.grad(fast(x), x, g)
    (b,) = torch.autograd.grad(ref(x), x, g)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_window_mask_rule_by_hand():
    m = zoo.build_mixer("window", D, n_heads=H, causal=True, window=3, dilation=2, global_tokens=[1])
    mask = m.dense_mask(10, "cpu")
    for i in range(10):
        for j in range(10):
            band = 0 <= i - j <= 4 and (i - j) % 2 == 0
            glob = 1 in (i, j) and j <= i
            assert mask[i, j] == (band or glob), (i, j)
    bidir = zoo.build_mixer("window", D, n_heads=H, causal=False, window=2, global_tokens=[])
    expected = (torch.arange(6)[:, None] - torch.arange(6)[None, :]).abs() <= 1
    assert torch.equal(bidir.dense_mask(6, "cpu"), expected)


@pytest.mark.parametrize("glob,position", [([0, 2], "none"), ([], "none"), ([3], "rope"), ([0, 2], "alibi")])
def test_window_decode_state_is_constant(glob, position):
    """Decoding equals the forward at every position: while the ring fills, and in the steady
    state (past the window and the last global position) where the step skips its mask."""
    m = zoo.build_mixer("window", D, n_heads=H, causal=True, window=4, global_tokens=glob,
                        position=position).double().eval()
    x = torch.randn(2, 30, D, dtype=torch.float64)
    size = zoo.state_nbytes(m.init_state(2))
    ys, state = zoo.decode(m, x)
    torch.testing.assert_close(ys, m(x))
    assert zoo.state_nbytes(state) == size


def test_window_errors():
    with pytest.raises(zoo.ZooConfigError, match=r"window needs window >= 1.*got window=0"):
        zoo.build_mixer("window", D, window=0)
    m = zoo.build_mixer("window", D, n_heads=H, window=4, global_every=8)
    with pytest.raises(zoo.ZooConfigError, match=r"a global position at or after window=4 would need the whole history"):
        m.init_state(1)
    with pytest.raises(zoo.ZooConfigError, match=r"global_tokens must be non-negative positions"):
        zoo.build_mixer("window", D, global_tokens=[-1])


# -- bigbird: the window with random key blocks -------------------------------------------
def test_bigbird_random_blocks_reach_beyond_the_window_and_only_there():
    """A late query sees exactly the window, the global tokens and its drawn blocks: its output
    moves when a drawn block's input moves and stays bit-identical when any other far block's does."""
    m = zoo.build_mixer("bigbird", D, n_heads=H, causal=True, window=4, block=4, random_blocks=2,
                        global_tokens=[]).double()
    T, i = 48, 11  # query block 11 (positions 44..47) draws 2 of the blocks 0..9
    drawn = set(m.random_pattern(12, "cpu")[i].tolist())
    assert len(drawn) == 2 and max(drawn) < i - 1
    x = torch.randn(1, T, D, dtype=torch.float64)
    y = m(x)[0, 44:]
    for blk in range(i - 1):
        x2 = x.clone()
        x2[0, 4 * blk : 4 * blk + 4] += 1.0
        same = torch.equal(m(x2)[0, 44:], y)
        assert same == (blk not in drawn), (blk, drawn)


def test_bigbird_pattern_is_fixed_per_module_and_kept_by_the_state_dict():
    a = zoo.build_mixer("bigbird", D, n_heads=H, window=4, block=4, random_blocks=2).double()
    b = zoo.build_mixer("bigbird", D, n_heads=H, window=4, block=4, random_blocks=2).double()
    assert not torch.equal(a.random_pattern(16, "cpu"), b.random_pattern(16, "cpu"))  # layers differ
    x = torch.randn(1, 64, D, dtype=torch.float64)
    b.load_state_dict(a.state_dict())  # weights and pattern_seed
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    # causal: a prefix's outputs do not depend on how long the sequence is
    torch.testing.assert_close(a(x[:, :37]), a(x)[:, :37], rtol=1e-12, atol=1e-12)


def test_bigbird_errors():
    m = zoo.build_mixer("bigbird", D, n_heads=H, window=4, block=4, random_blocks=2)
    with pytest.raises(zoo.ZooConfigError, match=r"random_blocks \(bigbird\) does not decode.*whole history"):
        m.init_state(1)
    with pytest.raises(zoo.ZooConfigError, match=r"random_blocks draws key blocks of `block` positions"):
        zoo.build_mixer("window", D, random_blocks=2)
    with pytest.raises(zoo.ZooConfigError, match=r"random_blocks >= 0"):
        zoo.build_mixer("bigbird", D, random_blocks=-1)


@pytest.mark.parametrize("name,kw", [
    ("bigbird", {"causal": True, "window": 5, "block": 4, "random_blocks": 2, "global_tokens": [0, 3]}),
    ("window", {"causal": False, "window": 4, "dilation": 2, "global_tokens": [5], "global_every": 11,
                "position": "alibi"}),
])
def test_flex_attention_backend_equals_the_blocked_one(name, kw):
    """The flex backend (auto's choice on CUDA) compiles on the CPU for the forward only: its
    block mask and ALiBi score modification against the blocked SDPA backend, and auto keeps
    the blocked backend on the CPU."""
    m = zoo.build_mixer(name, D, n_heads=H, **kw)
    assert m.backend_for(torch.device("cpu")) == "torch"
    x = torch.randn(2, 45, D)
    with torch.no_grad():
        q, k, v = m.project(x)
        torch.testing.assert_close(m.attend_flex(q, k, v), m.attend_torch(q, k, v), rtol=1e-5, atol=1e-5)


# -- lsh ---------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
def test_lsh_one_bucket_is_full_attention_with_self_masking(causal):
    T = 20
    m = zoo.build_mixer("lsh", D, n_heads=H, causal=causal, n_buckets=1, bucket_size=32, n_hashes=3).double()
    x = torch.randn(2, T, D, dtype=torch.float64)
    q, k, v = m.project(x)
    torch.testing.assert_close(k, q / q.norm(dim=-1, keepdim=True))
    s = (q @ k.transpose(-2, -1)) / (D // H) ** 0.5
    s = s.masked_fill(torch.eye(T, dtype=torch.bool), SELF_SCORE)
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    expected = m.merge(s.softmax(-1) @ v)
    for backend in ("reference", "torch"):
        m.backend = backend
        torch.testing.assert_close(m(x), expected)


def test_lsh_first_token_attends_itself_when_nothing_else_is_visible():
    m = zoo.build_mixer("lsh", D, n_heads=H, causal=True, n_buckets=1, bucket_size=8).double()
    x = torch.randn(1, 5, D, dtype=torch.float64)
    q, k, v = m.project(x)
    torch.testing.assert_close(m(x)[:, 0], m.merge(v)[:, 0])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kw", [
    {"bucket_size": 4, "n_hashes": 1},
    {"bucket_size": 5, "n_hashes": 3, "n_buckets": 6},
    {"bucket_size": 16, "n_hashes": 2},
    {"bucket_size": 50, "n_hashes": 2},
])
def test_lsh_chunked_equals_dense_mask_of_the_same_buckets(causal, kw):
    ref, fast = pair("lsh", causal=causal, **kw)
    x = torch.randn(2, 43, D, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-10, atol=1e-10)
    g = torch.randn(2, 43, D, dtype=torch.float64)
    (a,) = torch.autograd.grad(fast(x), x, g)
    (b,) = torch.autograd.grad(ref(x), x, g)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_lsh_hashing_is_seeded():
    x = torch.randn(1, 2, 64, 16)
    a = zoo.build_mixer("lsh", D, n_heads=H, seed=1)
    b = zoo.build_mixer("lsh", D, n_heads=H, seed=1)
    c = zoo.build_mixer("lsh", D, n_heads=H, seed=2)
    assert torch.equal(a.hash(x, 8), b.hash(x, 8))
    assert not torch.equal(a.hash(x, 8), c.hash(x, 8))
    assert a.hash(x, 8).max() == 7 and a.hash(x, 8).min() == 0


def test_lsh_chunk_attention_gradcheck():
    q, k, v = (torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    k2, v2 = (torch.cat((t, t.flip(1)), 1).detach().requires_grad_() for t in (k, v))
    masked = torch.rand(3, 4, 8) < 0.3
    masked[..., 0] = False
    masked[:, 1, 1] = True  # a masked key on the self diagonal: the self score wins

    def f(q, k, v):
        o, lse = _ChunkAttention.apply(q, k, v, masked, (0,))
        return o, lse
    assert torch.autograd.gradcheck(f, (q, k2, v2))
    # the self diagonal holds SELF_SCORE: a row whose other keys are all masked attends itself
    only_self = torch.ones(3, 4, 8, dtype=torch.bool)
    o, _ = _ChunkAttention.apply(q, k2, v2, only_self, (0,))
    torch.testing.assert_close(o, v2[:, :4])


def test_lsh_errors():
    with pytest.raises(zoo.ZooConfigError, match=r"n_buckets 0 \(auto\), 1 or even.*n_buckets=3"):
        zoo.build_mixer("lsh", D, n_buckets=3)


# -- linformer ---------------------------------------------------------------------------
def test_linformer_refuses_causal_with_the_reason():
    with pytest.raises(zoo.ZooConfigError, match=r"'linformer' cannot be causal. Its projection E mixes all positions"):
        zoo.build_mixer("linformer", D, causal=True)
    with pytest.raises(zoo.ZooConfigError, match=r"'linformer' cannot be causal"):
        zoo.build_model({"mixer": "linformer", "causal": True, "d_model": D})


@pytest.mark.parametrize("kw", [{}, {"share_kv": True}, {"share_heads": False}])
def test_linformer_backends_and_short_inputs(kw):
    ref, fast = pair("linformer", causal=False, max_len=40, k=6, **kw)
    for T in (40, 17):
        assert_same(ref, fast, torch.randn(2, T, D, dtype=torch.float64))
    with pytest.raises(zoo.ZooConfigError, match=r"built for max_len=40 positions and got 41"):
        fast(torch.randn(1, 41, D, dtype=torch.float64))


@pytest.mark.peers
@pytest.mark.parametrize("share_kv", [False, True])
def test_linformer_matches_the_linformer_package(share_kv):
    peer_mod = pytest.importorskip("linformer")
    peer = peer_mod.LinformerSelfAttention(dim=D, seq_len=24, k=6, heads=H, share_kv=share_kv).double()
    ours = zoo.build_mixer("linformer", D, n_heads=H, max_len=24, k=6, share_kv=share_kv, bias=True).double()
    with torch.no_grad():
        parts = [peer.to_q.weight, peer.to_k.weight, peer.to_v.weight if not share_kv else peer.to_k.weight]
        ours.qkv.weight.copy_(torch.cat(parts))
        ours.qkv.bias.zero_()
        ours.out.weight.copy_(peer.to_out.weight)
        ours.out.bias.copy_(peer.to_out.bias)
        ours.proj_k.copy_(peer.proj_k)
        if not share_kv:
            ours.proj_v.copy_(peer.proj_v)
    if share_kv:  # the package projects values with to_k when sharing: same weights here
        assert ours.proj_v is None
    for T in (24, 13):
        x = torch.randn(2, T, D, dtype=torch.float64)
        torch.testing.assert_close(ours(x), peer(x))


# -- linear ------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
@pytest.mark.parametrize("feature_map", ["elu", "relu", "softplus"])
def test_linear_chunked_equals_quadratic(causal, chunk, feature_map):
    ref, fast = pair("linear", causal=causal, chunk=chunk, feature_map=feature_map)
    x = torch.randn(2, 37, D, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-10, atol=1e-10)
    g = torch.randn(2, 37, D, dtype=torch.float64)  # the hand-written backward, inputs and weights
    a = torch.autograd.grad(fast(x), [x, *fast.parameters()], g)
    b = torch.autograd.grad(ref(x), [x, *ref.parameters()], g)
    for ga, gb in zip(a, b, strict=True):
        torch.testing.assert_close(ga, gb, rtol=1e-9, atol=1e-10)


def test_linear_recurrent_state_is_constant_and_equals_forward():
    m = zoo.build_mixer("linear", D, n_heads=H, causal=True).double().eval()
    x = torch.randn(2, 25, D, dtype=torch.float64)
    size = zoo.state_nbytes(m.init_state(2))
    assert size == 2 * H * (16 * 16 + 16) * 8
    ys, state = zoo.decode(m, x)
    torch.testing.assert_close(ys, m(x))
    assert zoo.state_nbytes(state) == size


def test_linear_normalizer_is_safe():
    m = zoo.build_mixer("linear", D, n_heads=H, causal=True, feature_map="relu")
    with torch.no_grad():
        m.qkv.weight[: 2 * D].fill_(-1.0)  # relu(q) = relu(k) = 0 for positive inputs
    y = m(torch.ones(1, 20, D) * 100)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("c", [1, 4, 12])
def test_linear_causal_chunked_gradcheck(c):
    q, k = (torch.rand(2, 3, 12, 5, dtype=torch.float64, requires_grad=True) for _ in range(2))  # phi >= 0
    v = torch.randn(2, 3, 12, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: CausalChunked.apply(q, k, v, c, 1e-6), (q, k, v))


def test_linear_unknown_feature_map():
    with pytest.raises(zoo.ZooConfigError, match=r"unknown feature_map of linear attention 'gelu'.*Allowed: elu, relu, softplus"):
        zoo.build_mixer("linear", D, feature_map="gelu")
    with pytest.raises(zoo.ZooConfigError, match=r"short_conv"):
        zoo.build_mixer("linear", D, short_conv=-1)


def test_efficient_mixers_train_in_a_model():
    """Every efficient mixer inside a model: a finite loss, and every parameter gets a finite,
    non-zero gradient (a parameter cut off from the loss has a zero or missing one)."""
    for name, causal in [("window", True), ("lsh", True), ("linear", True), ("linformer", False)]:
        model = zoo.build_model({"mixer": name, "causal": causal, "d_model": D, "n_layers": 2,
                                 "vocab_size": 20, "mixer_args": {"n_heads": H}, "allow_causal_leak": name == "lsh"})
        tokens = torch.randint(0, 20, (2, 33))
        loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        assert torch.isfinite(loss)
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, (name, pname)
