"""Build hook: ship lavis_ademvl_discovery.pth at the root of site-packages (metadata and options: setup.cfg).

A .pth file only runs from a site directory, so it must sit at the root of the wheel. `build_discovery_pth`, a
`build` sub-command, puts it there for both kinds of install:
- a regular wheel (`pip install .`, `pip wheel .`): into build_lib, whose files form the wheel's root;
- an editable wheel (`pip install -e .`, PEP 660): setuptools ignores build_lib there and writes files that cannot
  be editable (scripts, data) straight into the unpacked wheel, which its `editable_wheel` command sets as the
  `install` command's install_lib; the .pth goes there too. Its module, lavis_ademvl_discovery, is then importable
  through setuptools' `__editable__.lavis_ademvl-*.pth` finder, which Python reads first (.pth files run in sorted
  name order).
"""
from __future__ import annotations

import os
from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build
from setuptools.errors import SetupError

PTH = "lavis_ademvl_discovery.pth"


class build_discovery_pth(Command):
    description = f"put {PTH} at the root of the wheel"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        self.build_lib: str | None = None
        self.editable_mode = False

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def run(self) -> None:
        if self.editable_mode:
            root = Path(self.get_finalized_command("install").install_lib)
            if not any(root.glob("*.dist-info")):  # not the unpacked editable wheel: refuse rather than lose the .pth
                raise SetupError(f"cannot place {PTH} in the editable wheel: {root} holds no .dist-info "
                                 "(an unsupported setuptools version?); install without -e instead")
        else:
            root = Path(self.build_lib)
        self.copy_file(PTH, str(root / PTH), preserve_mode=False)

    def get_source_files(self) -> list[str]:
        return [PTH]

    def get_outputs(self) -> list[str]:
        return [os.path.join(self.build_lib, PTH)]

    def get_output_mapping(self) -> dict[str, str]:
        return {os.path.join(self.build_lib, PTH): PTH}


class build_with_discovery_pth(build):
    sub_commands = [*build.sub_commands, ("build_discovery_pth", None)]


setup(cmdclass={"build": build_with_discovery_pth, "build_discovery_pth": build_discovery_pth})
