"""Typed configs: YAML round trip, unknown keys and wrong types rejected by name."""

import pytest

import zoo
from zoo.config import Config, ModelConfig, from_dict


def test_yaml_round_trip(tmp_path):
    cfg = Config(model=ModelConfig(
        mixer=["softmax", "softmax", "softmax"], mixer_args={"softmax": {"n_heads": 4}, "rope_base": 500},
        channel="swiglu", d_model=64, n_layers=5, position="rope", norm="rmsnorm",
        norm_position="post", dropout=0.1, head="classify", n_classes=10, pool="last",
    ))
    path = tmp_path / "run.yaml"
    path.write_text(zoo.dump_config(cfg))
    again = zoo.load_config(path)
    assert again == cfg
    assert zoo.dump_config(again) == zoo.dump_config(cfg)
    model = zoo.build_model(again)
    assert model.blocks[0].mixer.n_heads == 4 and model.blocks[0].mixer.rotary is not None


@pytest.mark.parametrize("data,message", [
    ({"model": {"mixers": "softmax"}}, r"unknown key 'mixers' in run.yaml.model \(did you mean 'mixer'"),
    ({"modle": {}}, r"unknown key 'modle' in run.yaml \(did you mean 'model'"),
    ({"model": {"d_model": "wide"}}, r"run.yaml.model.d_model must be int, got 'wide'"),
    ({"model": {"mixer": ["softmax", 3]}}, r"run.yaml.model.mixer must be str or a list of str"),
    ({"model": {"norm": "batchnorm"}}, r"unknown value of model.norm 'batchnorm'.*Allowed: layernorm, rmsnorm"),
    ({"model": {"n_layers": 0}}, r"model.n_layers must be >= 1, got 0"),
    ({"model": {"head": "classify"}}, r"model.n_classes must be >= 2 for head 'classify'"),
    ({"model": {"mixer": []}}, r"model.mixer is an empty list"),
])
def test_bad_config_is_named(tmp_path, data, message):
    import yaml
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(zoo.ZooConfigError, match=message):
        zoo.load_config(path)


def test_bad_config_files(tmp_path):
    with pytest.raises(zoo.ZooConfigError, match=r"config file '.*nope.yaml' does not exist"):
        zoo.load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: {d_model: [\n")
    with pytest.raises(zoo.ZooConfigError, match=r"bad.yaml' is not valid YAML"):
        zoo.load_config(tmp_path / "bad.yaml")


def test_ints_are_accepted_for_floats():
    assert from_dict(ModelConfig, {"dropout": 0}).dropout == 0.0
