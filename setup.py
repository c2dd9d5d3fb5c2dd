"""Package layout only; all metadata is in pyproject.toml.

The jobs users run sit at the top of the repository (``data_prep/``, ``launchers/``, ``eval/``) but are
installed under the ``g3dr`` namespace, so that no generic top-level module named ``eval`` or
``launchers`` lands in site-packages: ``import g3dr.eval``, never ``import eval``.
"""

from setuptools import find_packages, setup

JOB_DIRS = ("data_prep", "launchers", "eval")

packages = find_packages(include=["g3dr", "g3dr.*"])
package_dir = {"g3dr": "g3dr"}
for job in JOB_DIRS:
    for pkg in find_packages(include=[job, f"{job}.*"]):
        packages.append(f"g3dr.{pkg}")
        package_dir[f"g3dr.{pkg}"] = pkg.replace(".", "/")

setup(packages=packages, package_dir=package_dir)
