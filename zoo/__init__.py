"""The zoo: interchangeable sequence mixers and one harness that compares them fairly.

    import zoo
    mixer = zoo.build_mixer("softmax", 256, causal=True, n_heads=4)
    model = zoo.build_model({"mixer": ["softmax", "softmax"], "n_layers": 4})
    zoo.default_registry().names("sequence_mixers")
"""

from zoo.config import Config, ModelConfig, dump_config, load_config
from zoo.contract import decode, state_nbytes
from zoo.errors import ZooConfigError
from zoo.model import ZooModel, build_model
from zoo.registry import Registry, build_mixer, default_registry

__all__ = [
    "Config",
    "ModelConfig",
    "Registry",
    "ZooConfigError",
    "ZooModel",
    "build_mixer",
    "decode",
    "build_model",
    "default_registry",
    "dump_config",
    "load_config",
    "state_nbytes",
]
