"""The CLI entry point, rank-aware logging, distributed environment resolution and the package layout."""

from __future__ import annotations

import ast
import importlib
import io
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from g3dr.launchers.main import SUBCOMMAND_MODULES, build_parser, main
from g3dr.distributed import DistEnv, resolve_dist_env
from g3dr.errors import ConfigError
from g3dr.log import get_logger, setup_logging

G3DR = Path(sys.executable).with_name("g3dr")


@pytest.fixture(autouse=True)
def restore_g3dr_logger():
    """These tests call setup_logging() on streams pytest closes afterwards: put the logger back as it was."""
    logger = logging.getLogger("g3dr")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


# ----------------------------------------------------------------------------- CLI


def test_console_script_help_lists_subcommands():
    out = subprocess.run([str(G3DR), "--help"], capture_output=True, text=True, check=True).stdout
    assert "usage: g3dr" in out
    for action in build_parser()._subparsers._group_actions[0].choices:
        assert action in out


def test_console_script_is_the_launchers_dispatcher(repo_root):
    """pyproject's ``g3dr`` script is the dispatcher in the job package (an installed ``g3dr`` runs the same
    ``main`` once the checkout is reinstalled)."""
    import tomllib

    scripts = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"g3dr": "g3dr.launchers.main:main"}
    module, _, name = scripts["g3dr"].partition(":")
    assert getattr(importlib.import_module(module), name) is main


def test_every_registered_module_adds_a_working_subcommand():
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices
    assert len(choices) >= len(SUBCOMMAND_MODULES)
    for name, sub in choices.items():
        assert sub.format_help(), name


def test_config_command_prints_resolved_yaml(tiny_config_path, tmp_path, capsys):
    assert main(["config", "--config", str(tiny_config_path), "train.lr=3e-4", "--save", str(tmp_path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 3e-4
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == printed


def test_user_errors_exit_nonzero_without_traceback(tiny_config_path):
    proc = subprocess.run([str(G3DR), "config", "-c", str(tiny_config_path), "train.lr=fast"],
                          capture_output=True, text=True)
    assert proc.returncode == ConfigError.exit_code
    assert "g3dr config: error: override 'train.lr=fast': train.lr: expected float" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_subcommand_is_an_argparse_error():
    proc = subprocess.run([str(G3DR), "frobnicate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


# ----------------------------------------------------------------------------- distributed env


def test_single_process_by_default():
    assert resolve_dist_env({}) == DistEnv(0, 0, 1, "single")


def test_torchrun_variables_win_over_slurm():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert resolve_dist_env(env) == DistEnv(3, 1, 4, "torchrun")


def test_slurm_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}
    dist = resolve_dist_env(env)
    assert dist == DistEnv(5, 1, 8, "slurm") and not dist.is_main


@pytest.mark.parametrize("env", [
    {"RANK": "4", "WORLD_SIZE": "4"},
    {"RANK": "x", "WORLD_SIZE": "4"},
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "0"},
])
def test_inconsistent_environment_is_a_clear_error(env):
    with pytest.raises(ConfigError):
        resolve_dist_env(env)


def test_dist_env_is_frozen():
    with pytest.raises(AttributeError):
        DistEnv().rank = 1  # type: ignore[misc]


# ----------------------------------------------------------------------------- logging


def _log_lines(dist: DistEnv) -> list[str]:
    stream = io.StringIO()
    setup_logging("INFO", dist=dist, stream=stream)
    log = get_logger("test")
    log.info("progress")
    log.warning("problem")
    return stream.getvalue().splitlines()


def test_rank0_logs_info_with_rank_in_format():
    lines = _log_lines(DistEnv(0, 0, 2, "torchrun"))
    assert len(lines) == 2
    assert "INFO" in lines[0] and "[rank 0] g3dr.test: progress" in lines[0]


def test_other_ranks_log_only_warnings():
    lines = _log_lines(DistEnv(1, 1, 2, "torchrun"))
    assert len(lines) == 1 and "WARNING" in lines[0] and "[rank 1]" in lines[0] and "problem" in lines[0]


def test_setup_logging_is_idempotent():
    stream = io.StringIO()
    for _ in range(3):
        setup_logging("INFO", dist=DistEnv(), stream=stream)
    get_logger("g3dr.once").info("hello")
    assert stream.getvalue().count("hello") == 1


# ----------------------------------------------------------------------------- layout


def test_job_packages_live_under_the_g3dr_namespace(repo_root):
    import g3dr.data_prep
    import g3dr.eval
    import g3dr.launchers

    assert Path(g3dr.eval.__file__).parent == repo_root / "eval"
    assert Path(g3dr.data_prep.__file__).parent == repo_root / "data_prep"
    assert Path(g3dr.launchers.__file__).parent == repo_root / "launchers"


def test_no_generic_top_level_modules_are_installed(tmp_path):
    """From a neutral directory, `eval`, `launchers` and `data_prep` are not importable top-level names."""
    code = ("import importlib.util as u; "
            "print([n for n in ('eval', 'launchers', 'data_prep', 'configs', 'tests') if u.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


JOB_PACKAGES = ("g3dr.data_prep", "g3dr.launchers", "g3dr.eval")


def imported_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in ``tree``, at any depth: ``import x``, ``from x import y`` (relative ones
    resolved against ``package``; ``from g3dr import eval`` counts as ``g3dr.eval``), and
    ``importlib.import_module("x")`` / ``__import__("x")`` with a string constant. Where a module imports by a
    computed name (``import_module(name)``), every dotted-name string constant in it counts too: a table of
    module names to import is an import."""
    found, dynamic = [], False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found += [(node.lineno, base)] + [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
        if isinstance(node, ast.Call) and node.args and not isinstance(node.args[0], ast.Constant):
            func = node.func
            dynamic |= (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")) in (
                "import_module", "__import__")
    if dynamic:
        found += [(node.lineno, node.value) for node in ast.walk(tree) if isinstance(node, ast.Constant)
                  and isinstance(node.value, str) and re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", node.value)]
    return found


def test_library_does_not_import_job_packages(repo_root):
    """g3dr/ is the library; the jobs call it, never the other way round: no file of g3dr/ imports a job package,
    at module level, inside a function or through importlib. No exemptions."""
    offenders = []
    for path in sorted((repo_root / "g3dr").rglob("*.py")):
        parts = path.relative_to(repo_root).with_suffix("").parts
        package = ".".join(parts if parts[-1] == "__init__" else parts[:-1]).removesuffix(".__init__")
        for line, module in imported_modules(ast.parse(path.read_text(), str(path)), package):
            if any(module == job or module.startswith(job + ".") for job in JOB_PACKAGES):
                offenders.append(f"{path.relative_to(repo_root)}:{line} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_import_finder_sees_every_form():
    """The layering test's reader finds what plain text matching missed: lazy, relative and importlib imports."""
    code = ("import os\n"
            "def f():\n    from g3dr.eval.cli import register\n"
            "def g():\n    import importlib\n    return importlib.import_module('g3dr.launchers.cli')\n"
            "from .. import eval\n"
            "from .sources import FileSource\n"
            "__import__('g3dr.data_prep')\n"
            "TABLE = ('g3dr.eval.study',)\n"
            "def h(names=TABLE):\n    return [importlib.import_module(n) for n in names]\n")
    modules = [m for _, m in imported_modules(ast.parse(code), "g3dr.data")]
    assert "g3dr.eval.study" in modules  # a table of names imported by a computed name
    assert "g3dr.eval.cli" in modules and "g3dr.launchers.cli" in modules and "g3dr.data_prep" in modules
    assert "g3dr.eval" in modules  # from .. import eval, inside package g3dr.data
    assert "g3dr.data.sources.FileSource" in modules
