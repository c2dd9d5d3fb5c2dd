"""g3dr-scale: the G3DR library (config, data, models, renderer, losses, training, metrics).

The jobs users run live in ``data_prep/``, ``launchers/`` and ``eval/`` at the top of the repository and
are installed as ``g3dr.data_prep``, ``g3dr.launchers`` and ``g3dr.eval`` (``package-dir`` in
``pyproject.toml``): they call this library, never the other way round, and no generic top-level
module such as ``eval`` is ever installed.
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

# A wheel places the job packages inside g3dr/. In a source checkout (the editable install of
# `make`), setuptools' editable finder maps only top-level packages, so let g3dr's package path also
# reach the checkout root: `g3dr.eval` then resolves to <root>/eval/. Nothing is added to sys.path.
_root = _Path(__file__).resolve().parent.parent
if (_root / "pyproject.toml").is_file() and (_root / "eval" / "__init__.py").is_file():
    __path__.append(str(_root))  # noqa: F821 (package __path__)
