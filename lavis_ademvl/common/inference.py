"""Loading a trained ADEM-VL for one-off use (prediction, drop maps) from a training config and checkpoint, and
building its input exactly as the config's evaluation dataset does."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lavis.common.config import Config
from lavis.common.registry import registry
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from lavis_ademvl.common.config_files import load_with_includes
from lavis_ademvl.common.dist import resolve_device
from lavis_ademvl.datasets.datasets.scienceqa_datasets import collate
from lavis_ademvl.models.ademvl import AdemVL
from lavis_ademvl.runners.runner_ademvl import seed_everything

MULTIPLE_CHOICE_TASK = "scienceqa_mc"


def load_config(cfg_path: str | Path, options: list[str] | None = None) -> DictConfig:
    """The experiment yaml (with includes) and key=value overrides, with the model type's defaults under `model`
    and each dataset's defaults under `datasets` (merged as LAVIS's Config merges them)."""
    config = OmegaConf.merge(load_with_includes(cfg_path), OmegaConf.from_dotlist(options or []))
    model_type = config.model.get("model_type")
    if model_type is None:
        raise KeyError(f"{cfg_path}: model.model_type is not set")
    defaults = OmegaConf.load(AdemVL.default_config_path(model_type))
    config.model = OmegaConf.merge(defaults.model, config.model)
    config.preprocess = defaults.get("preprocess", {})
    if config.get("datasets"):
        config.datasets = Config.build_dataset_config(config).datasets
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
    """(model in eval mode on the device, evaluation image processor, merged config).

    The random state is seeded as `lavis_ademvl.train`/`.evaluate` seed it before building the model, so a frozen
    tower initialised at random (a `llm_config`/`vision_config` model) is the one the checkpoint was trained with."""
    config = load_config(cfg_path, options)
    if checkpoint is not None:  # instead of the config's own model.finetuned, if any
        config.model.load_finetuned, config.model.finetuned = True, checkpoint
    seed_everything(int(config.run.get("seed", 42)))
    model = AdemVL.from_config(config.model)
    model = model.to(torch.device(resolve_device(device))).eval()
    return model, eval_image_processor(config), config


def question_batch(
    config: DictConfig,
    processor: Any,
    image: Image.Image | None,
    question: str | None = None,
    choices: list[str] | None = None,
    context: str = "",
    caption: str = "",
) -> dict[str, Any]:
    """A batch of one sample, as the config's evaluation split would build it.

    Multiple choice (task scienceqa_mc): made by the ScienceQA builder's evaluation sample maker (its image and text
    processors, prompt style and format, answer format); `context` is the hint, `caption` what captions.json would
    add. Otherwise: the image through `processor`, and the question (if any) as text_input.
    """
    task = config.run.get("task", "")
    if task == MULTIPLE_CHOICE_TASK:
        if not question or not choices:
            raise ValueError("this config answers multiple-choice questions (task scienceqa_mc): give --question and --choices")
        builder = registry.get_builder_class(MULTIPLE_CHOICE_TASK)(config.datasets[MULTIPLE_CHOICE_TASK])
        builder.check_keys()
        if caption and not builder.uses_captions(training=False):
            raise ValueError(
                "--caption: this config evaluates without captions (datasets.scienceqa_mc.build_info.use_caption)"
            )
        builder.build_processors()
        problem = {"question": question, "choices": list(choices), "hint": context}
        return collate([builder.sample_maker(training=False)(problem, image, caption)])
    if choices:
        raise ValueError(f"--choices is for multiple-choice models; this config's task is {task!r}")
    if image is None:
        raise ValueError("give --image")
    batch: dict[str, Any] = {"image": processor(image).unsqueeze(0), "has_image": torch.ones(1, dtype=torch.long)}
    if question:
        batch["text_input"] = [question]
    return batch
