"""f_trigen: the U-Net that lifts RGB-D to a triplane, the triplane decoder, the model the engine wraps,
and its checkpoint format; the super-resolution stage on its renders (see ``docs/models.md``).

The names below are imported on first use, so that the CLI modules of this package (``import_cli``,
``render_cli``) register their subcommands without importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FTrigen": "g3dr.models.f_trigen",
    "SuperResolution": "g3dr.models.sr",
    "build_sr": "g3dr.models.sr",
    "load_sr": "g3dr.models.sr",
    "save_sr": "g3dr.models.sr",
    "TriplaneDecoder": "g3dr.models.decoder",
    "TriplaneGenerator": "g3dr.models.unet",
    "load_f_trigen": "g3dr.models.checkpoint_io",
    "save_f_trigen": "g3dr.models.checkpoint_io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'g3dr.models' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
