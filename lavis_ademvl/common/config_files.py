"""Experiment configs: `includes:`, the one loader that training, evaluation and the tools share, and merged copies.

A yaml may start with `includes: [base.yaml, ...]` (paths relative to the yaml); the bases are merged in order, then
the yaml itself on top, so a variant states only what differs from its base. An annotation split set to null
(`datasets.X.build_info.annotations.train: null`) is left out, e.g. so an evaluation config does not need the
training files.

`load_experiment` gives LAVIS's `Config` of an experiment (a path or an in-memory config) and `--options` overrides,
merged as LAVIS merges them: the model type's defaults under `model` (and its `preprocess`), each dataset's defaults
under `datasets`, the experiment over the defaults, the options over everything. The options also choose which
defaults are read (`model.model_type=llama13b` reads llama13b.yaml's).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml
from lavis.common.config import Config
from lavis.common.registry import registry
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lavis_ademvl.common.validation import check_known_keys


def load_with_includes(path: str | Path, _seen: tuple[Path, ...] = ()) -> DictConfig:
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path in _seen:
        raise ValueError(f"config includes form a cycle: {' -> '.join(map(str, _seen + (path,)))}")
    try:
        config = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"config file {path} is not readable YAML: {error}") from error
    if not isinstance(config, DictConfig):
        raise ValueError(f"config file {path} holds a {type(config).__name__}, not a mapping of sections")
    includes = config.pop("includes", None) or []
    if not isinstance(includes, (list, ListConfig)) or not all(isinstance(include, str) for include in includes):
        raise ValueError(f"{path}: `includes:` must be a list of yaml paths, e.g. [../sqa.yaml], got {includes!r}")
    merged = OmegaConf.create()
    for include in includes:
        merged = OmegaConf.merge(merged, load_with_includes(path.parent / include, _seen + (path,)))
    return OmegaConf.merge(merged, config)


def drop_null_splits(datasets_cfg: DictConfig) -> None:
    """Remove annotation splits set to null (after LAVIS merged its dataset defaults, which list every split)."""
    for dataset in datasets_cfg.values():
        annotations = (dataset.get("build_info") or {}).get("annotations")
        if annotations is not None:
            for split in [s for s, value in annotations.items() if value is None]:
                del annotations[split]


def parse_options(options: Sequence[str]) -> DictConfig:
    """`key=value` overrides (or, as LAVIS's Config takes them, `key value` pairs) as a config; a malformed one is
    named."""
    options = list(options)
    if options and "=" not in options[0]:
        if len(options) % 2:
            raise ValueError(f"--options {' '.join(options)}: key value pairs, but {options[-1]!r} has no value; "
                             f"give key=value pairs, e.g. run.max_epoch=5")
        options = [f"{key}={value}" for key, value in zip(options[0::2], options[1::2])]
    dotlist = options
    for option in dotlist:
        if "=" not in option or not option.split("=", 1)[0].strip():
            raise ValueError(f"--options {option!r}: give key=value pairs, e.g. run.max_epoch=5")
    try:
        return OmegaConf.from_dotlist(dotlist)
    except (OmegaConfBaseException, yaml.YAMLError) as error:  # yaml's: a value that is no YAML, `[1,`
        raise ValueError(f"--options {' '.join(dotlist)}: {error}") from error


# The sections of an experiment (and of --options): `preprocess` holds the model type's image and text processors.
SECTIONS = ("model", "run", "datasets", "preprocess")


class ExperimentConfig(Config):
    """LAVIS's `Config` (run_cfg, model_cfg, datasets_cfg, ...) of an experiment, read by `load_experiment`."""

    def __init__(self, experiment: DictConfig, options: Sequence[str], source: str) -> None:
        # Config.__init__ reads one yaml file; the merge below is its own, over the options-applied experiment.
        self.args = argparse.Namespace(cfg_path=source, options=list(options))
        registry.register("configuration", self)
        user = parse_options(options)
        experiment = OmegaConf.merge(experiment, user)
        # A misspelt section (`rnu.max_epoch=1`) would otherwise be merged in and never read.
        check_known_keys("top-level", experiment.keys(), SECTIONS)
        if experiment.get("model") is None:
            raise KeyError(f"{source}: the config has no `model` section")
        check_registered(experiment, source)
        parts = [{"run": experiment.get("run") or {}}, self.build_model_config(experiment)]
        if experiment.get("preprocess"):  # over the model type's (LAVIS reads the model type's only)
            parts.append({"preprocess": experiment.preprocess})
        if experiment.get("datasets"):
            parts.append(self.build_dataset_config(experiment))
        self.config = OmegaConf.merge(*parts, user)
        if self.config.get("datasets"):
            drop_null_splits(self.config.datasets)


def check_registered(experiment: DictConfig, source: str) -> None:
    """The model arch, task, datasets and processors an experiment names are registered (else LAVIS fails with an
    assertion, or `'NoneType' object has no attribute 'from_config'` for a processor)."""
    names = [("model.arch", "model", experiment.model.get("arch"), "model_name_mapping")]
    if (experiment.get("run") or {}).get("task") is not None:
        names.append(("run.task", "task", experiment.run.task, "task_name_mapping"))
    names += [(f"datasets.{name}", "dataset", name, "builder_name_mapping") for name in experiment.get("datasets") or {}]
    names += [(key, "processor", name, "processor_name_mapping") for key, name in processor_names(experiment)]
    for key, kind, name, mapping in names:
        if name not in registry.mapping[mapping]:
            raise KeyError(f"{source}: {key}: unknown {kind} {name!r}; registered: {sorted(registry.mapping[mapping])}")


def processor_names(experiment: DictConfig) -> list[tuple[str, str]]:
    """(key, name) of every processor an experiment names: `datasets.X.{vis,text}_processor.{role}.name` and
    `preprocess.{vis,text}_processor.{role}.name`."""
    sections = {f"datasets.{name}": dataset for name, dataset in (experiment.get("datasets") or {}).items()}
    sections["preprocess"] = experiment.get("preprocess")
    found = []
    for where, section in sections.items():
        for kind in ("vis_processor", "text_processor"):
            roles = section.get(kind) if isinstance(section, DictConfig) else None
            for role, processor in (roles or {}).items():
                if isinstance(processor, DictConfig) and "name" in processor:
                    found.append((f"{where}.{kind}.{role}.name", processor.name))
    return found


def load_experiment(experiment: str | Path | DictConfig, options: Sequence[str] = ()) -> ExperimentConfig:
    """The merged config of an experiment yaml (with includes) or in-memory config, and key=value `options`."""
    if isinstance(experiment, DictConfig):
        return ExperimentConfig(experiment, options, source="the experiment config")
    return ExperimentConfig(load_with_includes(experiment), options, source=str(experiment))


@contextlib.contextmanager
def written_config(config: DictConfig, prefix: str = "lavis_ademvl_") -> Iterator[Path]:
    """`config` as a temporary yaml file (for another process to read), removed when the block ends."""
    handle = tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=prefix, delete=False)
    try:
        with handle:
            handle.write(OmegaConf.to_yaml(config))
        yield Path(handle.name)
    finally:
        os.unlink(handle.name)
