"""The shared base of this plugin's builders: a dataset read from local files (nothing is downloaded), its config keys
checked before any file is read."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from omegaconf import DictConfig

from lavis_ademvl.common.validation import check_choice, check_known_keys

CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs" / "datasets"


class LocalFilesBuilder(BaseDatasetBuilder):
    """A LAVIS builder of local files. A subclass names its registry `name` (its defaults are
    configs/datasets/<name>/defaults.yaml) and the keys its config and its `build_info` may hold, and writes `build`."""

    name: ClassVar[str]
    DATASET_KEYS: ClassVar[frozenset[str]] = frozenset({"data_type", "build_info", "vis_processor", "text_processor",
                                                        "type"})
    BUILD_INFO_KEYS: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.DATASET_CONFIG_DICT = {"default": str(CONFIG_ROOT / cls.name / "defaults.yaml")}

    @classmethod
    def default_config_path(cls, type: str = "default") -> str:
        check_choice(f"{cls.name} type", type, tuple(cls.DATASET_CONFIG_DICT))
        return cls.DATASET_CONFIG_DICT[type]

    def build_datasets(self) -> dict[str, Any]:
        # Every rank reads the files itself: LAVIS's version downloads on the main process and waits at a barrier.
        return self.build()

    def checked_build_info(self) -> DictConfig:
        """`build_info`, once the config's keys and build_info's are known ones (the error lists them)."""
        check_known_keys(f"datasets.{self.name}", set(self.config.keys()), self.DATASET_KEYS)
        build_info = self.config.get("build_info") or DictConfig({})
        check_known_keys(f"datasets.{self.name}.build_info", set(build_info.keys()), self.BUILD_INFO_KEYS)
        return build_info

    def data_root(self, build_info: DictConfig, holding: str) -> Path:
        """The folder `build_info.data_root` (`holding`: what it should hold, for the error when it is not set)."""
        if not build_info.get("data_root"):
            raise ValueError(f"datasets.{self.name}.build_info.data_root is not set; point it at {holding}")
        root = Path(os.path.expanduser(str(build_info.data_root)))
        if not root.is_dir():
            raise FileNotFoundError(f"datasets.{self.name}.build_info.data_root is not a folder: {root}")
        return root
