"""Job configuration: the sections (`sections`), how a config is built from YAML, overrides and the
environment (`loading`), and which settings change results (`hashing`). Config imports storage (for its
section), never the reverse."""

from eagle.config.hashing import RESULT_SECTIONS, config_hash
from eagle.config.loading import deep_merge, described_yaml, dump_config, load_config, parse_overrides
from eagle.config.sections import (
    IMAGE_EXTENSIONS,
    ConfidenceConfig,
    ConfigError,
    ExpertConfig,
    GuidanceConfig,
    InputConfig,
    JobConfig,
    MLLMConfig,
    OutputConfig,
    PromptConfig,
    RayConfig,
    RegionsConfig,
    Resources,
    RoutingConfig,
    StageResources,
    ThresholdConfig,
)
from eagle.io.storage import StorageConfig

__all__ = ["IMAGE_EXTENSIONS", "RESULT_SECTIONS", "ConfidenceConfig", "ConfigError", "ExpertConfig",
           "GuidanceConfig", "InputConfig", "JobConfig", "MLLMConfig", "OutputConfig", "PromptConfig", "RayConfig",
           "RegionsConfig", "Resources", "RoutingConfig", "StageResources", "StorageConfig", "ThresholdConfig",
           "config_hash", "deep_merge", "described_yaml", "dump_config", "load_config", "parse_overrides"]
