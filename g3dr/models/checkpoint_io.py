"""f_trigen weights on disk: one fp32 ``.safetensors`` file that carries everything needed to rebuild it.

The file holds the state dict of :class:`~g3dr.models.f_trigen.FTrigen` in float32 and, as safetensors
string metadata:

- ``format``: ``g3dr-scale/f_trigen``; ``format_version``: ``1``;
- ``config``: the resolved :class:`~g3dr.config.Config` as YAML (so the model can be rebuilt exactly);
- ``step``: the optimizer step the weights belong to;
- ``plane_convention``: the triplane projection the weights were trained with (``eg3d`` or ``orthogonal``);
- ``source``: where the weights came from (``train``, ``import-official``, ...), plus any extra keys.

Loading rebuilds the model from the stored config and loads the tensors with ``strict=True``: missing,
unexpected or mis-shaped tensors are a :class:`~g3dr.errors.WeightsError` naming them. Training state
(optimizer, data position) is not kept here; the trainer's checkpoints own that.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path
from typing import Any

import torch
import yaml

from g3dr.config import Config, config_from_dict, dump_config
from g3dr.errors import ConfigError, WeightsError
from g3dr.log import get_logger

FORMAT = "g3dr-scale/f_trigen"
FORMAT_VERSION = "1"
_RESERVED = ("format", "format_version", "config", "step", "plane_convention")

log = get_logger("g3dr.models.checkpoint_io")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # A DeepSpeed engine or DDP keeps the real module in ``.module``.
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _fp32_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        out[name] = tensor.contiguous().clone()
    return out


def save_f_trigen(model: torch.nn.Module, cfg: Config, path: str | Path, step: int = 0, source: str = "train",
                  extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s weights (fp32) and ``cfg`` to ``path`` (a ``.safetensors`` file), atomically.

    ``model`` is an :class:`FTrigen` (or an engine wrapping one in ``.module``). Returns the path.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise WeightsError(f"checkpoint path {path} must end in .safetensors")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": dump_config(cfg),
        "step": str(int(step)),
        "plane_convention": cfg.renderer.plane_convention,
        "source": source,
    }
    for key, value in (extra_metadata or {}).items():
        if key in _RESERVED:
            raise ValueError(f"extra metadata key {key!r} is reserved")
        metadata[key] = str(value)
    tensors = _fp32_cpu(_unwrap(model).state_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    # safetensors creates its file with mode 0600 whatever the umask; give it the mode every other output gets.
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    return path


def _umask() -> int:
    """This process's umask (read without changing it where Linux tells it, else set and restored at once)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_f_trigen_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a checkpoint, with ``step`` as int and ``config`` as a nested dict (not validated)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        if (path / "meta.json").is_file() or (path / "mp_rank_00_model_states.pt").is_file():
            out = path.parent.parent / "exports" / f"{path.name}.safetensors"
            raise WeightsError(f"{path} is a training checkpoint folder (DeepSpeed), not an f_trigen .safetensors file; "
                               f"export it first: g3dr export {path} {out}")
        raise WeightsError(f"{path} is a folder, not an f_trigen .safetensors file (a training run's export is "
                           "RUN/f_trigen.safetensors; 'g3dr export RUN/checkpoints/step-N' writes one per checkpoint)")
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist (train one with 'g3dr train' or convert the "
                           f"released model with 'g3dr import-official SRC {path}')")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for a bad header
        raise WeightsError(f"{path} is not a readable .safetensors file ({err}); a reference "
                           "checkpoint_generic.pt must first be converted with 'g3dr import-official'") from None
    if raw.get("format") != FORMAT:
        raise WeightsError(f"{path} is a safetensors file but not a g3dr f_trigen checkpoint "
                           f"(metadata format={raw.get('format')!r}, expected {FORMAT!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise WeightsError(f"{path} has checkpoint format version {raw.get('format_version')!r}; this g3dr reads "
                           f"version {FORMAT_VERSION}")
    meta: dict[str, Any] = dict(raw)
    try:
        meta["step"] = int(raw["step"])
        meta["config"] = yaml.safe_load(raw["config"])
    except (KeyError, ValueError, yaml.YAMLError) as err:
        raise WeightsError(f"{path}: checkpoint metadata is incomplete or corrupt ({err!r})") from None
    return meta


def check_state_dict_keys(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise a WeightsError listing missing, unexpected and mis-shaped tensors of ``state`` for ``model``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(f"{k}: {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or mis_shaped:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if items:
                parts.append(f"{len(items)} {label}: " + ", ".join(items))
        raise WeightsError(f"{what} does not match the model built from its config; " + "; ".join(parts))


def _prune_unknown_keys(data: Any, cls: type, prefix: str = "") -> list[str]:
    """Remove (in place) keys of a stored config that the current config schema no longer has."""
    if not isinstance(data, dict):
        return []
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    dropped = []
    for key in list(data):
        if key not in names:
            dropped.append(prefix + str(key))
            del data[key]
        elif dataclasses.is_dataclass(hints[key]):
            dropped += _prune_unknown_keys(data[key], hints[key], f"{prefix}{key}.")
    return dropped


def load_f_trigen(path: str | Path, device: str | torch.device = "cpu",
                  overrides: list[str] | tuple[str, ...] = ()) -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """Rebuild the FTrigen stored at ``path`` on ``device``; returns ``(model, cfg, meta)``.

    ``overrides`` are dotted config overrides applied to the stored config before the model is built
    (render-time settings such as ``renderer.sigma_scale=5`` or ``renderer.deterministic=true``);
    overrides that change the architecture or the plane convention fail to load or are refused.
    The model is returned in eval mode.
    """
    from safetensors.torch import load_file

    from g3dr.models.f_trigen import FTrigen

    path = Path(path)
    meta = read_f_trigen_metadata(path)
    # A checkpoint written by an older g3dr may name config keys that no longer exist; they cannot
    # matter to the current code, so they are dropped (with a warning) rather than failing the load.
    dropped = _prune_unknown_keys(meta["config"], Config)
    if dropped:
        log.warning("%s: ignoring stored config keys unknown to this version of g3dr: %s", path, ", ".join(dropped))
    data = meta["config"].get("data") if isinstance(meta["config"], dict) else None
    if isinstance(data, dict) and data.get("shards") and data.get("source", "synthetic") != "shards":
        # Written before data.shards without data.source=shards became an error: it trained on the synthetic set.
        log.warning("%s: stored data.shards=%r was never used (data.source=%r); ignoring it", path, data["shards"],
                    data.get("source", "synthetic"))
        data["shards"] = ""
    cfg = config_from_dict(meta["config"], overrides, source=f"{path} (stored config)")
    if cfg.renderer.plane_convention != meta["plane_convention"]:
        raise ConfigError(f"{path} was trained with plane convention {meta['plane_convention']!r}; "
                          f"renderer.plane_convention={cfg.renderer.plane_convention!r} would render it wrongly")
    state = load_file(str(path), device="cpu")
    model = FTrigen(cfg)
    check_state_dict_keys(model, state, f"checkpoint {path}")
    model.load_state_dict(state, strict=True)
    model.to(device).eval()
    log.info("loaded f_trigen from %s (step %d, plane convention %s, source %s)",
             path, meta["step"], meta["plane_convention"], meta.get("source", "?"))
    return model, cfg, meta
