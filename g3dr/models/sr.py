"""The 128 -> 256 super-resolution stage: an RCAN image network on f_trigen's rendered RGB.

The paper (S.6) shows results with and without a super-resolution module; the reference code only calls an
RCAN-type ``model_sr_rcan`` on the 128 px render (``visualize.py``: ``[-1, 1] -> [0, 1]``, the network,
clamp to ``[0, 1]``). The network is spandrel's RCAN (``spandrel.architectures.RCAN``), not a copy of ours;
spandrel also detects an RCAN's hyperparameters from a bare state dict, which is what reading the authors'
file (or any other RCAN checkpoint) needs.

Files:

- ours: one fp32 ``.safetensors`` holding the RCAN state dict under RCAN's own tensor names (so spandrel and
  other RCAN tools read it too) and, as string metadata, ``format`` (``g3dr-scale/sr``), ``format_version``,
  ``architecture`` (the RCAN hyperparameters as JSON) and ``source`` (``train``, ``import-official``, ...);
- foreign: an RCAN state dict in a ``.pth``/``.pt``/``.ckpt`` (read with ``torch.load(weights_only=True)``:
  tensors and plain containers only, never arbitrary objects) or a ``.safetensors`` without our metadata,
  possibly wrapped (``{"params": ...}``, ``{"state_dict": ...}``, ``module.`` prefixes: spandrel's
  ``canonicalize_state_dict``).

RCAN's input convention (EDSR-PyTorch, kept by spandrel): the network takes RGB in ``[0, 1]``, multiplies it
by ``rgb_range`` (255 in the published models) and subtracts the DIV2K mean with a fixed 1x1 convolution
(``sub_mean``; ``add_mean`` adds it back at the end); ``norm: false`` drops both. The mean-shift
convolutions are constants of the method: they are frozen here (spandrel leaves them trainable), and
``rgb_range``, which spandrel cannot detect (it assumes 255), is read back from the stored ``sub_mean``
bias (``-rgb_range * mean``), so a network trained with ``rgb_range: 1`` is run as it was trained.

This module must not import deepspeed, mlflow or submitit.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from g3dr.errors import WeightsError
from g3dr.log import get_logger

FORMAT = "g3dr-scale/sr"
FORMAT_VERSION = "1"
_RESERVED = ("format", "format_version", "architecture")
# The DIV2K RGB mean that RCAN's mean shift subtracts (EDSR-PyTorch; spandrel's MeanShift uses the same).
_RGB_MEAN = (0.4488, 0.4371, 0.4040)
# The RCAN constructor arguments we record; ``conv`` (a callable) is always RCAN's default convolution.
ARCHITECTURE_KEYS = ("scale", "n_resgroups", "n_resblocks", "n_feats", "n_colors", "rgb_range", "norm",
                     "kernel_size", "reduction", "res_scale", "act_mode", "unshuffle_mod")

log = get_logger("g3dr.models.sr")


class SuperResolution(nn.Module):
    """RCAN on rendered RGB in ``[-1, 1]``: ``(B, 3, H, W) -> (B, 3, scale * H, scale * W)``, both in ``[-1, 1]``.

    ``scale`` (int) and ``architecture`` (a JSON-able dict of the RCAN hyperparameters, :data:`ARCHITECTURE_KEYS`)
    describe the network; ``rcan`` is the spandrel module, whose ``state_dict`` is what :func:`save_sr` writes.
    Build one with :func:`build_sr` (random init) or :func:`load_sr` (a file).
    """

    def __init__(self, architecture: dict[str, Any]):
        super().__init__()
        from spandrel.architectures.RCAN import RCAN

        unknown = sorted(set(architecture) - set(ARCHITECTURE_KEYS))
        if unknown:
            raise ValueError(f"unknown RCAN hyperparameters {unknown}; known: {', '.join(ARCHITECTURE_KEYS)}")
        self.rcan = RCAN(**architecture)
        # The effective values (RCAN's defaults fill what ``architecture`` leaves out).
        self.architecture: dict[str, Any] = {k: self.rcan.hyperparameters[k] for k in ARCHITECTURE_KEYS}
        self.scale: int = int(self.architecture["scale"])
        self.source: str = "new"  # where the weights came from; load_sr sets it from the file
        self.path: str = ""  # the file load_sr read
        if self.architecture["n_colors"] != 3:
            raise ValueError(f"the super-resolution stage works on RGB: n_colors must be 3, got "
                             f"{self.architecture['n_colors']}")
        for shift in (self.rcan.sub_mean, self.rcan.add_mean):
            for p in shift.parameters():  # constants (EDSR-PyTorch freezes them; spandrel's flag does not)
                p.requires_grad_(False)

    def forward(self, rgb: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Upscale ``rgb`` (B, 3, H, W) in ``[-1, 1]`` to (B, 3, scale * H, scale * W) in ``[-1, 1]``.

        As the reference's ``visualize.py``: ``[-1, 1] -> [0, 1]``, RCAN, clamp to ``[0, 1]``, then back to
        ``[-1, 1]``. ``clamp=False`` skips the clamp (its gradient is zero outside the range), e.g. for a loss.
        Differentiable with respect to ``rgb`` and the RCAN parameters.
        """
        if rgb.dim() != 4 or rgb.shape[1] != 3:
            raise ValueError(f"expected RGB of shape (B, 3, H, W), got {tuple(rgb.shape)}")
        x = (rgb + 1) / 2  # a new tensor: RCAN multiplies its input by rgb_range in place
        y = self.rcan(x)
        if clamp:
            y = y.clamp(0.0, 1.0)
        return y * 2 - 1


def build_sr(cfg: Any) -> SuperResolution:
    """A randomly initialised RCAN for training from scratch, from an ``SRConfig`` (``scale``, ``n_resgroups``,
    ``n_resblocks``, ``n_feats``, ``reduction``); the rest are RCAN's published values (RGB, ``rgb_range``
    255 with the DIV2K mean shift, 3x3 kernels, ReLU, no pixel-unshuffle head). The caller seeds torch."""
    return SuperResolution(dict(scale=cfg.scale, n_resgroups=cfg.n_resgroups, n_resblocks=cfg.n_resblocks,
                                n_feats=cfg.n_feats, reduction=cfg.reduction, n_colors=3, rgb_range=255,
                                norm=True, kernel_size=3, res_scale=1, act_mode="relu", unshuffle_mod=False))


def describe_architecture(arch: dict[str, Any]) -> str:
    """One line for logs and the CLI, e.g. ``RCAN x2: 10 residual groups x 20 blocks, 64 features, ...``."""
    text = (f"RCAN x{arch['scale']}: {arch['n_resgroups']} residual groups x {arch['n_resblocks']} blocks, "
            f"{arch['n_feats']} features, channel-attention reduction {arch['reduction']}, "
            f"kernel {arch['kernel_size']}, rgb_range {arch['rgb_range']}, "
            f"mean shift {'on' if arch['norm'] else 'off'}")
    if arch.get("unshuffle_mod"):
        text += ", pixel-unshuffle head"
    return text


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    # A DeepSpeed engine or DDP keeps the real module in ``.module``.
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def save_sr(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s RCAN weights (fp32) and architecture to ``path`` (``.safetensors``), atomically.

    ``model`` is a :class:`SuperResolution` (or an engine wrapping one in ``.module``). ``metadata`` adds string
    entries; its ``source`` (default ``g3dr``) says where the weights came from. Returns the path.
    """
    from safetensors.torch import save_file

    from g3dr.models.checkpoint_io import _fp32_cpu, _umask

    model = _unwrap(model)
    if not isinstance(model, SuperResolution):
        raise TypeError(f"save_sr expects a SuperResolution, got {type(model).__name__}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"super-resolution weights path {path} must end in .safetensors")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": json.dumps(model.architecture),
            "source": "g3dr"}
    for key, value in (metadata or {}).items():
        if key in _RESERVED:
            raise ValueError(f"metadata key {key!r} is reserved")
        meta[key] = str(value)
    tensors = _fp32_cpu(model.rcan.state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors writes 0600 whatever the umask
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return load_file(str(path), device="cpu"), meta
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise WeightsError(f"super-resolution weights {path} are not a readable .safetensors file ({err})") from None


def _read_torch_file(path: Path) -> Any:
    import pickle
    import re

    try:
        # weights_only: tensors and plain containers only; a file that needs any other class is refused.
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise WeightsError(f"super-resolution weights {path} hold more than tensors and plain containers "
                               f"(they reference {found.group(1)}) and are not unpickled; save the RCAN state dict "
                               "alone, e.g. torch.save(model.state_dict(), 'rcan.pth'), and import that") from None
        cause = f"{type(err).__name__}"
    except Exception as err:
        cause = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    raise WeightsError(f"super-resolution weights {path} are not a torch file that torch.load can read ({cause}); "
                       "expected an RCAN state dict (.pth/.pt) or a .safetensors file")


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of an SR weights file and its safetensors metadata (empty for torch files).

    A torch file's wrappers (``params``/``params_ema``/``state_dict``/``model`` keys, a ``module.`` prefix) are
    removed. Raises :class:`~g3dr.errors.WeightsError` when the file is missing or is not a state dict.
    """
    from spandrel import canonicalize_state_dict

    path = Path(path)
    if path.is_dir():
        raise WeightsError(f"super-resolution weights {path} is a folder, not a weights file (.safetensors or .pth)")
    if not path.is_file():
        raise WeightsError(f"super-resolution weights {path} do not exist: convert an RCAN state dict (e.g. the "
                           f"G3DR authors' file, linked from the reference README) with "
                           f"'g3dr import-official --sr FILE {path}', or give no super-resolution weights")
    if path.suffix == ".safetensors":
        state, meta = _read_safetensors(path)
        if meta.get("format") == FORMAT:
            return state, meta
        obj: Any = state
    else:
        obj, meta = _read_torch_file(path), {}
    if not isinstance(obj, dict):
        raise WeightsError(f"super-resolution weights {path} hold a {type(obj).__name__}, not a state dict "
                           "(a mapping of tensor names to tensors)")
    state = canonicalize_state_dict(obj)
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)] \
        if isinstance(state, dict) else ["<not a mapping>"]
    if not state or bad:
        keys = ", ".join(map(str, list(obj)[:6]))
        raise WeightsError(f"super-resolution weights {path} are not a state dict of tensors (top-level keys: "
                           f"{keys or 'none'}{'; non-tensor entries: ' + ', '.join(map(str, bad[:4])) if bad else ''})")
    return state, meta


def _detected(state: dict[str, torch.Tensor]) -> str:
    """What spandrel recognises in ``state``: ``'RCAN'``, another architecture's id, or ``''``."""
    from spandrel import MAIN_REGISTRY

    for support in MAIN_REGISTRY.architectures("detection"):
        try:
            if support.detect(state):
                return str(support.architecture.id)
        except Exception:  # a detector tripping over an unexpected tensor means "not this one"
            continue
    return ""


def _rgb_range_from_mean_shift(state: dict[str, torch.Tensor], path: Path) -> float | int:
    """``rgb_range`` read back from ``sub_mean``: bias = -rgb_range * mean / std, weight = eye / std."""
    weight, bias = state["sub_mean.weight"].double(), state["sub_mean.bias"].double()
    inv_std = torch.diagonal(weight.reshape(3, 3))
    ranges = (-bias / inv_std / torch.tensor(_RGB_MEAN, dtype=torch.float64)).tolist()
    value = sum(ranges) / 3
    if not all(math.isfinite(r) and r > 0 for r in ranges) or max(ranges) - min(ranges) > 1e-3 * abs(value):
        raise WeightsError(f"{path}: the RCAN mean shift (sub_mean) does not subtract the DIV2K mean times one "
                           f"rgb_range (per-channel ranges {[round(r, 4) for r in ranges]}); this is not a standard "
                           "RCAN and its input scaling cannot be recovered")
    return int(round(value)) if abs(value - round(value)) < 1e-3 * max(1.0, abs(value)) else value


def _architecture_from_foreign(state: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    from spandrel import MAIN_REGISTRY

    found = _detected(state)
    if found != "RCAN":
        what = f"spandrel detects a {found} network" if found else "spandrel recognises no architecture in it"
        keys = ", ".join(list(state)[:4])
        raise WeightsError(f"super-resolution weights {path} are not an RCAN state dict: {what} (first tensors: "
                           f"{keys}); the super-resolution stage needs RCAN weights")
    try:
        descriptor = MAIN_REGISTRY["RCAN"].architecture.load(state)
    except Exception as err:  # missing, extra or mis-shaped tensors
        raise WeightsError(f"super-resolution weights {path} look like RCAN but do not load as one: "
                           f"{str(err).strip().splitlines()[0]}") from None
    arch = {k: descriptor.model.hyperparameters[k] for k in ARCHITECTURE_KEYS}
    if arch["norm"]:
        arch["rgb_range"] = _rgb_range_from_mean_shift(state, path)
    return arch


def load_sr(path: str | Path, device: str | torch.device = "cpu") -> SuperResolution:
    """The super-resolution network stored at ``path``, in eval mode on ``device``.

    ``path`` is our ``.safetensors`` (:func:`save_sr`) or any RCAN state dict that spandrel recognises
    (``.pth``/``.pt``/``.ckpt`` or ``.safetensors``; see the module docstring). The returned module's
    ``source`` attribute says which (``g3dr``/``train``/... from our metadata, or ``foreign``).
    Raises :class:`~g3dr.errors.WeightsError` naming the file when it is missing, not a state dict, not RCAN
    or does not match its stored architecture.
    """
    from g3dr.models.checkpoint_io import check_state_dict_keys

    path = Path(path)
    state, meta = read_state_dict(path)
    if meta.get("format") == FORMAT:
        if meta.get("format_version") != FORMAT_VERSION:
            raise WeightsError(f"{path} has super-resolution format version {meta.get('format_version')!r}; this "
                               f"g3dr reads version {FORMAT_VERSION}")
        try:
            arch = json.loads(meta["architecture"])
            model = SuperResolution(arch)
        except (KeyError, ValueError, TypeError) as err:
            raise WeightsError(f"{path}: super-resolution metadata is incomplete or corrupt ({err})") from None
        source = meta.get("source", "g3dr")
    else:
        arch = _architecture_from_foreign(state, path)
        try:
            model = SuperResolution(arch)
        except ValueError as err:
            raise WeightsError(f"super-resolution weights {path}: {err}") from None
        source = "foreign"
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    check_state_dict_keys(model.rcan, state, f"super-resolution weights {path}")
    model.rcan.load_state_dict(state, strict=True)
    model.source, model.path = source, str(path)
    model.to(device).eval()
    log.info("loaded super-resolution weights %s (%s; source %s)", path, describe_architecture(model.architecture),
             source)
    return model
