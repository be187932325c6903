import pytest
import torch

from zoo.registry import SEQUENCE, default_registry

D_MODEL = 32


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs CUDA")
    if not torch.cuda.is_available():
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def sequence_cases():
    """(name, causal, position) for every registered sequence mixer and what it can do."""
    cases = []
    for e in default_registry().entries(SEQUENCE):
        for causal in [c for c, ok in ((True, e.causal), (False, e.bidirectional)) if ok]:
            for position in [p for p in ("none", "rope", "alibi") if p in e.positions]:
                cases.append(pytest.param(e.name, causal, position,
                                          id=f"{e.name}-{'causal' if causal else 'bidir'}-{position}"))
    return cases


def build_tiny(name: str, **overrides):
    """A registry entry at its tiny debug size, in fp32 eval mode."""
    e = default_registry().mixer(name)
    return default_registry().build_mixer(name, D_MODEL, **{**e.tiny, **overrides}).eval()
