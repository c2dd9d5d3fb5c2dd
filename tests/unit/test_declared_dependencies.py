"""Every third-party module our code imports is a declared dependency (pyproject.toml: the main list or an
extra), not something that happens to arrive through another package."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CODE = ("g3dr", "eval", "data_prep", "launchers")
NOT_OURS_TO_DECLARE = {
    "triton": "a requirement of torch's CUDA builds (the pinned torch brings the matching version); GPU path only",
}
REFERENCE_PARITY = "eval/reference_parity.py"
"""Imports the paper's and EG3D's own code from checkouts named by environment variables (not packages)."""
IMPORT_TO_DIST = {"PIL": "pillow", "yaml": "pyyaml", "open_clip": "open_clip_torch", "skimage": "scikit-image",
                  "imageio_ffmpeg": "imageio-ffmpeg", "mpl_toolkits": "matplotlib"}


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"]) + [d for extra in project["optional-dependencies"].values() for d in extra]
    return {re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].lower().replace("_", "-") for spec in specs}


def _imported() -> dict[str, str]:
    """Top-level module -> one file importing it (absolute imports only)."""
    found: dict[str, str] = {}
    for folder in CODE:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.relative_to(ROOT).as_posix() == REFERENCE_PARITY:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_declared():
    declared = _declared()
    ours = {"g3dr", *CODE, "g3dr_test_support", "__future__"}
    missing = {}
    for module, where in _imported().items():
        if module in sys.stdlib_module_names or module in ours or module in NOT_OURS_TO_DECLARE:
            continue
        dist = IMPORT_TO_DIST.get(module, module).lower().replace("_", "-")
        if dist not in declared:
            missing[module] = where
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
