"""Typed configuration: one dataclass per stage, loaded from YAML with dotted overrides.

``load_config(preset_or_path, ["train.lr=3e-4", "objectives=[empathy]"])`` returns a :class:`RunConfig`.
Unknown keys and wrong types are errors that name the key path and list the valid keys, raised before
any model is loaded. The resolved config is saved to ``RUN/config.yaml`` so a run can be reproduced.

The package: :mod:`~emorl.config.schema` (the dataclasses), :mod:`~emorl.config.coerce` (types and overrides),
:mod:`~emorl.config.validate` (cross-field checks), :mod:`~emorl.config.load` (presets, YAML, run folders).
"""

from emorl.config.coerce import parse_override
from emorl.config.load import PRESET_DIR, describe, load_config, load_run_config, preset_names, read_yaml
from emorl.config.schema import (
    DataConfig,
    EvalConfig,
    ExecutorConfig,
    FrontConfig,
    GenerationConfig,
    LoraConfig,
    ModelConfig,
    RouteConfig,
    RunConfig,
    SearchConfig,
    TrainConfig,
)
from emorl.config.validate import validate

__all__ = ["PRESET_DIR", "DataConfig", "EvalConfig", "ExecutorConfig", "FrontConfig", "GenerationConfig",
           "LoraConfig", "ModelConfig", "RouteConfig", "RunConfig", "SearchConfig", "TrainConfig", "describe",
           "load_config", "load_run_config", "parse_override", "preset_names", "read_yaml", "validate"]
