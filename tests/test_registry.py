"""Registry: validation, clear errors, user overlays."""

import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import zoo
from zoo.cli import main as zoo_main
from zoo.contract import SequenceMixer, implements
from zoo.registry import Registry


class ToyMixer(nn.Module):
    """A causal running mean: y_t = W mean(x_0..x_t). Bidirectional: the global mean."""

    def __init__(self, d_model, *, causal, scale: float = 1.0):
        super().__init__()
        self.causal, self.scale = causal, scale
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        if self.causal:
            n = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]
            return self.scale * self.proj(x.cumsum(1) / n)
        return self.scale * self.proj(x.mean(1, keepdim=True).expand_as(x))


class CudaOnlyMixer(SequenceMixer):
    AUTO_ORDER = ("fast", "reference")

    def forward(self, x):
        return self.implementation("forward", x.device)(x)

    @implements("reference", op="forward")
    def forward_reference(self, x):
        return x

    @implements("fast", op="forward", devices=("cuda",))
    def forward_fast(self, x):
        return x


class NotAModule:
    def __init__(self, d_model, *, causal):
        pass


def overlay(tmp_path, text, name="overlay.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


TOY = """
sequence_mixers:
  toy:
    class: test_registry.ToyMixer
    description: running mean
    defaults: {scale: 0.5}
    causal: true
    bidirectional: true
    positions: [none, learned]
"""


def test_overlay_adds_a_mixer_and_builds_it(tmp_path):
    reg = Registry.load(overlay(tmp_path, TOY), env=False)
    assert "toy" in reg.names("sequence_mixers") and "softmax" in reg.names("sequence_mixers")
    m = reg.build_mixer("toy", 16, causal=False)
    assert isinstance(m, ToyMixer) and m.scale == 0.5 and not m.causal
    model = zoo.build_model({"mixer": ["toy", "softmax"], "n_layers": 3, "d_model": 16,
                             "mixer_args": {"n_heads": 2}}, registry=reg)
    assert [type(b.mixer).__name__ for b in model.blocks] == ["ToyMixer", "SoftmaxAttention", "ToyMixer"]
    assert model(torch.randint(0, 256, (2, 9))).shape == (2, 9, 256)


def test_overlay_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_REGISTRY", str(overlay(tmp_path, TOY)))
    assert isinstance(zoo.build_mixer("toy", 8), ToyMixer)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(zoo.ZooConfigError, match=r"unknown mixer 'sofmax' \(did you mean 'softmax'\?\)"):
        zoo.build_mixer("sofmax", 32)


def test_unknown_hyper_parameter_names_it_and_the_allowed_ones():
    with pytest.raises(zoo.ZooConfigError, match=r"sequence mixer 'softmax': unknown hyper-parameter 'n_head' \(did you mean 'n_heads'.*\?\)\. Allowed: .*head_dim"):
        zoo.build_mixer("softmax", 32, n_head=2)


def test_bad_hyper_parameter_type_and_value():
    with pytest.raises(zoo.ZooConfigError, match=r"'n_heads' must be int .* got 'two'"):
        zoo.build_mixer("softmax", 32, n_heads="two")
    with pytest.raises(zoo.ZooConfigError, match=r"d_model=32 is not divisible by n_heads=3"):
        zoo.build_mixer("softmax", 32, n_heads=3)
    with pytest.raises(zoo.ZooConfigError, match=r"unknown backend .* 'fast'.*Allowed: auto, reference, torch, xformers"):
        zoo.build_mixer("softmax", 32, backend="fast")


def test_position_a_mixer_cannot_take(tmp_path):
    reg = Registry.load(overlay(tmp_path, TOY), env=False)
    with pytest.raises(zoo.ZooConfigError, match=r"sequence mixer 'toy' cannot use position 'rope'; it accepts: none, learned"):
        reg.build_mixer("toy", 16, position="rope")
    with pytest.raises(zoo.ZooConfigError, match=r"unknown positional scheme 'rotary'.*Allowed: .*rope"):
        zoo.build_mixer("softmax", 16, position="rotary")
    with pytest.raises(zoo.ZooConfigError, match=r"cannot use position 'rope'"):
        zoo.build_model({"mixer": "toy", "position": "rope", "d_model": 16}, registry=reg)


def test_causal_refused_with_the_reason(tmp_path):
    path = overlay(tmp_path, """
    sequence_mixers:
      lowrank:
        class: test_registry.ToyMixer
        description: bidirectional only
        causal: false
        notes: It mixes the whole sequence at once.
    """)
    reg = Registry.load(path, env=False)
    with pytest.raises(zoo.ZooConfigError, match=r"'lowrank' cannot be causal. It mixes the whole sequence"):
        reg.build_mixer("lowrank", 16, causal=True)
    assert reg.build_mixer("lowrank", 16).causal is False  # default follows the capability


def test_bad_yaml(tmp_path):
    path = overlay(tmp_path, "sequence_mixers:\n  toy: [unclosed\n")
    with pytest.raises(zoo.ZooConfigError, match=r"overlay.yaml' is not valid YAML"):
        Registry.load(path, env=False)


@pytest.mark.parametrize("entry,message", [
    ("class: test_registry.ToyMixer\n    description: x\n    casual: true",
     r"unknown key 'casual' in sequence mixer 'bad'.*did you mean 'causal'"),
    ("description: x", r"missing required key\(s\) \['class'\]"),
    ("class: test_registry.Nope\n    description: x", r"module 'test_registry' has no class 'Nope'"),
    ("class: no_such_module.Mixer\n    description: x", r"cannot import module 'no_such_module'"),
    ("class: test_registry.NotAModule\n    description: x", r"is not an nn.Module class"),
    ("class: test_registry.ToyMixer\n    description: x\n    defaults: {width: 3}",
     r"\(defaults\): unknown hyper-parameter 'width'. Allowed: causal, scale"),
    ("class: test_registry.ToyMixer\n    description: x\n    positions: [rope]",
     r"lists \['rope'\] in positions but test_registry.ToyMixer takes no 'position'"),
    ("class: test_registry.ToyMixer\n    description: x\n    causal: yes please",
     r"'causal' must be true or false"),
    ("class: test_registry.CudaOnlyMixer\n    description: x\n    backends: [reference]",
     r"backends \['reference'\] differ from the backends .*CudaOnlyMixer implements \['reference', 'fast'\]"),
])
def test_bad_entries_are_named(tmp_path, entry, message):
    path = overlay(tmp_path, f"sequence_mixers:\n  bad:\n    {entry}\n")
    with pytest.raises(zoo.ZooConfigError, match=message):
        Registry.load(path, env=False)


def test_duplicate_name_needs_replace(tmp_path):
    text = "sequence_mixers:\n  softmax:\n    class: test_registry.ToyMixer\n    description: x\n"
    with pytest.raises(zoo.ZooConfigError, match=r"already registered .* set 'replace: true'"):
        Registry.load(overlay(tmp_path, text), env=False)
    reg = Registry.load(overlay(tmp_path, text + "    replace: true\n"), env=False)
    assert isinstance(reg.build_mixer("softmax", 8), ToyMixer)
    text = "sequence_mixers:\n  mlp:\n    class: test_registry.ToyMixer\n    description: x\n"
    with pytest.raises(zoo.ZooConfigError, match=r"already registered as a channel mixer"):
        Registry.load(overlay(tmp_path, text), env=False)


def test_backend_on_the_wrong_device(tmp_path):
    path = overlay(tmp_path, """
    sequence_mixers:
      cudaonly:
        class: test_registry.CudaOnlyMixer
        description: x
        backends: [reference, fast]
    """)
    reg = Registry.load(path, env=False)
    reg.build_mixer("cudaonly", 8, backend="auto")(torch.zeros(1, 2, 8))  # auto falls back
    with pytest.raises(zoo.ZooConfigError, match=r"backend 'fast' of CudaOnlyMixer runs on cuda, not on cpu"):
        reg.build_mixer("cudaonly", 8, backend="fast")(torch.zeros(1, 2, 8))


def test_channel_mixers_take_no_causal_flag():
    with pytest.raises(zoo.ZooConfigError, match=r"channel mixer 'mlp' takes no 'causal'"):
        zoo.build_mixer("mlp", 8, causal=True)
    assert zoo.build_mixer("swiglu", 8)(torch.zeros(1, 3, 8)).shape == (1, 3, 8)


def test_zoo_list_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ZOO_REGISTRY", raising=False)
    assert zoo_main(["--registry", str(overlay(tmp_path, TOY)), "list"]) == 0
    out = capsys.readouterr().out
    assert "| softmax | strict | yes | yes |" in out and "| toy |" in out and "| swiglu |" in out
    assert zoo_main(["--registry", str(tmp_path / "missing.yaml"), "list"]) == 2
    assert "missing.yaml' does not exist" in capsys.readouterr().err


def test_zoo_list_shows_strict_and_mask_only_causality(capsys):
    from zoo.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "| lsh | mask only |" in out and "| mamba | strict |" in out and "| linformer | - |" in out
    assert "| mamba | Gu & Dao 2023, Mamba, arXiv:2312.00752 | time O(N d_inner d_state)" in out  # paper, complexity


# -- where the built-in registry comes from -----------------------------------------------------
ROOT = Path(zoo.__file__).resolve().parents[1]
LIST_MIXERS = "import zoo.registry as r; print(r.package_file()); print(sorted(r.Registry.load(env=False).names('sequence_mixers')))"


def _python(code: str, pythonpath, cwd) -> list[str]:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    env.pop("ZOO_REGISTRY", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="needs the source checkout")
def test_a_wheel_ships_the_top_level_registry(tmp_path):
    """The wheel carries registry.yaml inside the package, and an install from it reads that copy."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path / "dist")], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("zoo-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("zoo/registry.yaml") == (ROOT / "registry.yaml").read_bytes()
        z.extractall(tmp_path / "site")
    where, names = _python(LIST_MIXERS, tmp_path / "site", cwd=tmp_path)
    assert where == str(tmp_path / "site" / "zoo" / "registry.yaml")
    assert names == str(sorted(Registry.load(env=False).names("sequence_mixers")))


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="needs the source checkout")
def test_a_checkout_reads_its_top_level_registry_at_once(tmp_path):
    """An editable install (the package inside a checkout) reads the top-level file, so an edit to it
    shows at once; the check runs on a copy of the checkout with one mixer added."""
    import shutil

    shutil.copytree(ROOT / "zoo", tmp_path / "zoo", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    text = (ROOT / "registry.yaml").read_text()
    added = "sequence_mixers:\n  softmax_copy:\n    class: zoo.mixers.softmax.SoftmaxAttention\n    description: a second name\n    positions: [none, sinusoidal, learned, rope, alibi]\n    backends: [reference, torch, xformers]\n"
    (tmp_path / "registry.yaml").write_text(text.replace("sequence_mixers:\n", added, 1))
    where, names = _python(LIST_MIXERS, tmp_path, cwd=tmp_path.parent)
    assert where == str(tmp_path / "registry.yaml")
    assert "softmax_copy" in names and "softmax_copy" not in str(sorted(Registry.load(env=False).names("sequence_mixers")))


def test_list_shows_every_hyper_parameter_with_its_default(capsys):
    assert zoo_main(["list"]) == 0
    out = capsys.readouterr().out
    window = next(line for line in out.splitlines() if line.startswith("| window | bias="))
    assert "window=256" in window and "n_heads=0" in window and "causal" not in window
    mqar = next(line for line in out.splitlines() if line.startswith("| mqar |"))
    assert "n_queries=0" in mqar and "train_size=4096" in mqar and "n_pairs=8" in mqar
