"""The configuration of a run: the typed tree (:mod:`.schema`), recipes and overrides (:mod:`.load`), and what it
means on a given world (:mod:`.run`). ``from fastclr.config import ...`` is the one import the library uses."""
from .load import (DEFAULT_RECIPE, RECIPES_DIR, describe, dump_config, field_docs, from_dict, load_config,
                   parse_override, recipe_path, save_config, shipped_recipes, to_dict)
from .run import (BatchPlan, autocast_dtype, batch_plan, check_dataset_fits, check_resume_compatible,
                  deepspeed_config, missing_paths, validate_run)
from .schema import (Arch, AugmentConfig, Backend, CheckpointConfig, Config, ConfigError, DataConfig, Dataset,
                     DistributedConfig, Dtype, EvalConfig, LoggingConfig, LossConfig, LossImpl, LrScaling, ModelConfig,
                     OptimConfig, PrecisionConfig, TrainConfig, choices)

__all__ = ["Arch", "AugmentConfig", "Backend", "BatchPlan", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
           "Dataset", "DEFAULT_RECIPE", "DistributedConfig", "Dtype", "EvalConfig", "LoggingConfig", "LossConfig",
           "LossImpl", "LrScaling", "ModelConfig", "OptimConfig", "PrecisionConfig", "RECIPES_DIR", "TrainConfig",
           "autocast_dtype", "batch_plan", "check_dataset_fits", "check_resume_compatible", "choices",
           "deepspeed_config", "describe", "dump_config", "field_docs", "from_dict", "load_config", "missing_paths",
           "parse_override", "recipe_path", "save_config", "shipped_recipes", "to_dict", "validate_run"]
