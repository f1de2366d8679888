"""Teachers and students: open_clip models (ours are config JSONs in configs/), loading, training."""

from curate.models.teacher import (
    Teacher,
    create_model,
    load_teacher,
    model_config,
    register_configs,
    resolve_device,
    save_checkpoint,
)

__all__ = ["Teacher", "create_model", "load_teacher", "model_config", "register_configs", "resolve_device",
           "save_checkpoint"]
