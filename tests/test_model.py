"""The model: layer patterns, heads, positions, decoding, causality, auxiliary losses."""

import pytest
import torch
from torch import nn

import zoo
from zoo.registry import Registry

TINY = {"d_model": 32, "n_layers": 2, "vocab_size": 50, "mixer_args": {"n_heads": 2}}


@pytest.mark.parametrize("position", ["none", "sinusoidal", "learned", "rope", "alibi"])
@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_lm_decode_equals_forward_and_is_causal(position, norm_position):
    model = zoo.build_model({**TINY, "position": position, "norm_position": norm_position,
                             "norm": "rmsnorm"}).double().eval()
    tokens = torch.randint(0, 50, (2, 21))
    logits = model(tokens)
    assert logits.shape == (2, 21, 50)
    torch.testing.assert_close(model.decode(tokens)[0], logits)
    changed = tokens.clone()
    changed[:, 15:] = (changed[:, 15:] + 1) % 50
    torch.testing.assert_close(model(changed)[:, :15], logits[:, :15])


def test_tied_and_untied_heads():
    tied = zoo.build_model({**TINY, "tie_weights": True})
    assert tied.head.weight is tied.embed.weight
    untied = zoo.build_model(TINY)  # the default
    assert untied.head.weight is not untied.embed.weight
    assert untied.num_params() - tied.num_params() == 50 * 32


def test_embeddings_start_at_embed_std():
    big = zoo.build_model({**TINY, "vocab_size": 4000, "position": "learned", "max_len": 4000})
    small = zoo.build_model({**TINY, "vocab_size": 4000, "position": "learned", "max_len": 4000, "embed_std": 0.02})
    for model, std in ((big, 1.0), (small, 0.02)):
        for table in (model.embed.weight, model.pos.table.weight):
            assert abs(table.std().item() - std) < 0.05 * std


@pytest.mark.parametrize("pool", ["mean", "last", "first"])
def test_classification_head(pool):
    model = zoo.build_model({**TINY, "head": "classify", "n_classes": 10, "causal": False, "pool": pool})
    assert model(torch.randint(0, 50, (3, 17))).shape == (3, 10)


def test_reconstruct_head_reads_only_the_last_state():
    """MAD's compression decoder: logits for every position, from the last position's hidden
    state alone (no gradient reaches the others); such a model does not decode."""
    model = zoo.build_model({**TINY, "head": "reconstruct"})
    tokens = torch.randint(0, 50, (3, 17))
    h = model.hidden(tokens).detach().requires_grad_(True)
    logits = model.head(h[:, -1], 17)
    assert logits.shape == (3, 17, 50) and torch.equal(logits, model(tokens))
    logits.sum().backward()
    assert h.grad[:, :-1].abs().max() == 0 and h.grad[:, -1].abs().max() > 0
    with pytest.raises(zoo.ZooConfigError, match=r"cannot decode: model.head is 'reconstruct'.*needs head 'lm'"):
        model.init_state(1)


def test_hybrid_pattern_cycles_over_layers():
    model = zoo.build_model({**TINY, "n_layers": 5, "mixer": ["softmax"], "channel": ["mlp", "swiglu"]})
    assert [type(b.channel).__name__ for b in model.blocks] == ["MLP", "SwiGLU", "MLP", "SwiGLU", "MLP"]


def test_mixer_args_nobody_takes():
    with pytest.raises(zoo.ZooConfigError, match=r"no mixer of \['softmax'\] takes 'd_state'; allowed keys: .*n_heads"):
        zoo.build_model({**TINY, "mixer_args": {"d_state": 16}})
    with pytest.raises(zoo.ZooConfigError, match=r"model.mixer_args.window must be a mapping"):
        zoo.build_model({**TINY, "mixer_args": {"window": 8}})
    with pytest.raises(zoo.ZooConfigError, match=r"model.mixer: 'mlp' is a channel mixer"):
        zoo.build_model({**TINY, "mixer": "mlp"})


def test_a_mixers_own_args_wait_while_it_is_not_in_the_model():
    args = {"softmax": {"n_heads": 4}, "window": {"window": 3}}  # one file for every mixer of a sweep
    softmax = zoo.build_model({**TINY, "mixer_args": args})
    assert softmax.blocks[0].mixer.n_heads == 4
    window = zoo.build_model({**TINY, "mixer": "window", "mixer_args": args})
    assert window.blocks[0].mixer.window == 3


def test_learned_positions_bound_the_length():
    model = zoo.build_model({**TINY, "position": "learned", "max_len": 16})
    with pytest.raises(zoo.ZooConfigError, match=r"length 20 exceeds model.max_len=16"):
        model(torch.randint(0, 50, (1, 20)))


class AuxChannel(nn.Module):
    """A channel mixer with an auxiliary loss: the mean square of its input."""

    def __init__(self, d_model):
        super().__init__()
        self.lin = nn.Linear(d_model, d_model)
        self.aux_losses = {}

    def forward(self, x):
        self.aux_losses = {"energy": x.pow(2).mean()}
        return self.lin(x)


def test_aux_losses_are_gathered_by_name(tmp_path):
    (tmp_path / "aux.yaml").write_text(
        "channel_mixers:\n  aux:\n    class: test_model.AuxChannel\n    description: x\n")
    reg = Registry.load(tmp_path / "aux.yaml", env=False)
    model = zoo.build_model({**TINY, "n_layers": 3, "channel": ["aux", "mlp"]}, registry=reg)
    model(torch.randint(0, 50, (2, 7)))
    aux = model.aux_losses()
    expected = model.blocks[0].channel.aux_losses["energy"] + model.blocks[2].channel.aux_losses["energy"]
    assert set(aux) == {"energy"}
    torch.testing.assert_close(aux["energy"], expected)
    aux["energy"].backward()
    assert model.embed.weight.grad is not None
