"""DeepSpeed JSON configs: load from ds_configs/, refuse "auto", and write the recipe's batch sizes in.

Batch sizes are stated once, in the recipe. A DeepSpeed JSON may leave them out; if it states one that
disagrees with the recipe, that is an error rather than a silent winner.
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.train.recipe import RecipeError, ScheduleSection

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def resolve_ds_config_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    for candidate in (path, DS_CONFIG_DIR / path.name, DS_CONFIG_DIR / f"{name_or_path}.json"):
        if candidate.is_file():
            return candidate
    available = sorted(p.name for p in DS_CONFIG_DIR.glob("*.json"))
    raise RecipeError(f"DeepSpeed config '{name_or_path}' not found: set dist.ds_config to a JSON path or "
                      f"one of {available}")


def _find_auto(node, where: str = "") -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{where}.{key}" if where else key)
            if found:
                return found
    elif node == "auto":
        return where
    return None


def build_ds_config(name_or_path: str, schedule: ScheduleSection, world_size: int) -> dict:
    path = resolve_ds_config_path(name_or_path)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RecipeError(f"DeepSpeed config {path} is not valid JSON (line {err.lineno}): fix its syntax") from err
    auto_key = _find_auto(config)
    if auto_key:
        raise RecipeError(f"DeepSpeed config {path} sets {auto_key} to \"auto\", which plain DeepSpeed ignores "
                          "(bf16 \"auto\" silently means fp32): write an explicit value")
    hpz = config.get("zero_optimization", {}).get("zero_hpz_partition_size", 1)
    if hpz > 1 and world_size % hpz:
        raise RecipeError(f"DeepSpeed config {path} sets zero_hpz_partition_size={hpz} (ZeRO++: GPUs per node) but "
                          f"the job has {world_size} ranks, not a multiple: set it to the ranks per node in a copy of "
                          "the JSON")
    wanted = {
        "train_micro_batch_size_per_gpu": schedule.micro_batch_size,
        "gradient_accumulation_steps": schedule.grad_accum,
        "train_batch_size": schedule.micro_batch_size * schedule.grad_accum * world_size,
    }
    for key, value in wanted.items():
        if key in config and config[key] != value:
            raise RecipeError(f"DeepSpeed config {path} sets {key}={config[key]} but the recipe gives {value} "
                              f"(micro_batch_size={schedule.micro_batch_size} x grad_accum={schedule.grad_accum}"
                              f" x world_size={world_size}): delete it from the JSON; batch sizes live in the recipe")
        config[key] = value
    return config


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def with_universal_load(config: dict) -> dict:
    """The config for resuming from a universal checkpoint (saved by another number of ranks)."""
    return {**config, "checkpoint": {**config.get("checkpoint", {}), "load_universal": True}}
