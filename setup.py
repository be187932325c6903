"""Everything is declared in pyproject.toml; this file only ships the top-level ``registry.yaml``
inside the package of a wheel (as ``zoo/registry.yaml``), where ``zoo.registry.package_file``
finds it. An editable install reads the top-level file itself and needs no copy."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def run(self):
        super().run()
        if not getattr(self, "editable_mode", False):
            source = Path(__file__).with_name("registry.yaml")
            self.copy_file(str(source), str(Path(self.build_lib, "zoo", "registry.yaml")))


setup(cmdclass={"build_py": BuildPy})
