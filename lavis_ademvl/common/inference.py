"""Loading a trained ADEM-VL for one-off use (prediction, drop maps) from a training config and checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lavis.common.registry import registry
from omegaconf import DictConfig, OmegaConf

from lavis_ademvl.common.config_files import load_with_includes
from lavis_ademvl.common.dist import resolve_device
from lavis_ademvl.models.ademvl import AdemVL


def load_config(cfg_path: str | Path, options: list[str] | None = None) -> DictConfig:
    """The experiment yaml (with includes) and key=value overrides, with the model type's defaults under `model`."""
    config = OmegaConf.merge(load_with_includes(cfg_path), OmegaConf.from_dotlist(options or []))
    model_type = config.model.get("model_type")
    if model_type is None:
        raise KeyError(f"{cfg_path}: model.model_type is not set")
    defaults = OmegaConf.load(AdemVL.default_config_path(model_type))
    config.model = OmegaConf.merge(defaults.model, config.model)
    config.preprocess = defaults.get("preprocess", {})
    return config


def eval_image_processor(config: DictConfig) -> Any:
    """The evaluation image transform of the config's first dataset, else of the model type."""
    processor_cfg = None
    for dataset in (config.get("datasets") or {}).values():
        processor_cfg = (dataset.get("vis_processor") or {}).get("eval")
        break
    processor_cfg = processor_cfg or config.preprocess.vis_processor.eval
    return registry.get_processor_class(processor_cfg.name).from_config(processor_cfg)


def load_for_inference(
    cfg_path: str | Path, checkpoint: str | None, options: list[str] | None = None, device: str = "auto"
) -> tuple[AdemVL, Any, DictConfig]:
    """(model in eval mode on the device, evaluation image processor, merged config)."""
    config = load_config(cfg_path, options)
    model = AdemVL.from_config(config.model)
    if checkpoint is not None:
        model.load_checkpoint(checkpoint)
    model = model.to(torch.device(resolve_device(device))).eval()
    return model, eval_image_processor(config), config
