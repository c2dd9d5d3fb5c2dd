"""Offline weight files: the registry of known files, lock files, ``verify_for`` (every job's pre-flight
check) and resumable verified downloads. See ``docs/weights.md``.

Importing this package is cheap (stdlib + PyYAML; no torch), so job entry points and the CLI can use it.
"""

from g3dr.weights.registry import (Lock, LockEntry, Registry, RegistryFile, WeightEntry, load_lock,
                                   load_registry, write_lock)
from g3dr.weights.verify import (DEPTH_MODEL_KEY, FileCheck, Requirement, check_requirements, file_sha256,
                                 format_table, lock_entries, requirements_for, verify_for)

__all__ = [
    "DEPTH_MODEL_KEY", "FileCheck", "Lock", "LockEntry", "Registry", "RegistryFile", "Requirement", "WeightEntry",
    "check_requirements", "file_sha256", "format_table", "load_lock", "load_registry", "lock_entries",
    "requirements_for", "verify_for", "write_lock",
]
