"""Import the G3DR reference training checkpoint (preddy5/G3DR ``checkpoint_generic.pt``) into our format.

The reference saves ``{"step", "model", "opt", "scheduler"}`` with ``torch.save``; ``model`` is the
state dict of its ``Unet`` (which holds the decoder as ``decoder.*``; its renderer has no tensors),
usually with the ``module.`` prefix of the data-parallel wrapper. This module maps those names onto
:class:`~g3dr.models.f_trigen.FTrigen`'s (``generator.*``, ``decoder.*``) with a table of patterns, checks
every name and shape, and writes our safetensors checkpoint with the EG3D plane convention (the
reference projects onto the planes xy, xz, zx). Optimizer and scheduler state are dropped.

Name mapping (reference -> ours), ``R`` a ResNet block:

================================================  ==============================================
``pos_embed``, ``init_conv.*``, ``final_conv.*``   same names under ``generator.``
``time_mlp.1.*`` / ``time_mlp.3.*``                ``time_embed.fc1.*`` / ``time_embed.fc2.*``
``{downs,ups}.i.0.R`` / ``.1.R``                   ``{down,up}.i.blocks.0.R`` / ``.blocks.1.R``
``{downs,ups}.i.2.fn.norm.g``                      ``{down,up}.i.attn.norm.gain``
``{downs,ups}.i.2.fn.fn.to_qkv.weight``            ``{down,up}.i.attn.to_qkv.weight``
``{downs,ups}.i.2.fn.fn.to_out.0.*`` / ``.1.g``    ``{down,up}.i.attn.to_out.*`` / ``.out_norm.gain``
``{downs,ups}.i.3.1.*`` or ``.3.*`` (last)          ``{down,up}.i.resample.conv.*``
``mid_block1.R`` / ``mid_block2.R``                ``mid.res1.R`` / ``mid.res2.R``
``mid_attn.fn.norm.g``, ``mid_attn.fn.fn.to_*``    ``mid.attn.norm.gain``, ``mid.attn.to_*``
``final_res_block.R``                              ``final_block.R``
``decoder.net.0.*`` / ``decoder.net.2.*``          ``decoder.hidden.*`` / ``decoder.out.*``
R: ``mlp.1.*``, ``block{1,2}.proj.*``,             ``time_proj.*``, ``block{1,2}.conv.*``,
``block{1,2}.norm.*``, ``res_conv.*``              ``block{1,2}.norm.*``, ``skip.*``
================================================  ==============================================
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import pickle
import re
import types
from pathlib import Path
from typing import Any, Mapping

import torch

from g3dr.config import Config
from g3dr.errors import ConfigError, WeightsError
from g3dr.log import get_logger

log = get_logger("g3dr.models.reference_import")

# Prefixes that wrappers add in front of every name (accelerate/DDP, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_RESBLOCK_RULES = (
    (r"mlp\.1\.(weight|bias)", r"time_proj.\1"),
    (r"block([12])\.proj\.(weight|bias)", r"block\1.conv.\2"),
    (r"block([12])\.norm\.(weight|bias)", r"block\1.norm.\2"),
    (r"res_conv\.(weight|bias)", r"skip.\1"),
)

_TOP_RULES = (
    (r"pos_embed", "generator.pos_embed"),
    (r"init_conv\.(weight|bias)", r"generator.init_conv.\1"),
    (r"final_conv\.(weight|bias)", r"generator.final_conv.\1"),
    (r"time_mlp\.1\.(weight|bias)", r"generator.time_embed.fc1.\1"),
    (r"time_mlp\.3\.(weight|bias)", r"generator.time_embed.fc2.\1"),
    (r"decoder\.net\.0\.(weight|bias)", r"decoder.hidden.\1"),
    (r"decoder\.net\.2\.(weight|bias)", r"decoder.out.\1"),
    (r"(down|up)s\.(\d+)\.2\.fn\.norm\.g", r"generator.\1.\2.attn.norm.gain"),
    (r"(down|up)s\.(\d+)\.2\.fn\.fn\.to_qkv\.weight", r"generator.\1.\2.attn.to_qkv.weight"),
    (r"(down|up)s\.(\d+)\.2\.fn\.fn\.to_out\.0\.(weight|bias)", r"generator.\1.\2.attn.to_out.\3"),
    (r"(down|up)s\.(\d+)\.2\.fn\.fn\.to_out\.1\.g", r"generator.\1.\2.attn.out_norm.gain"),
    (r"(down|up)s\.(\d+)\.3\.(?:1\.)?(weight|bias)", r"generator.\1.\2.resample.conv.\3"),
    (r"mid_attn\.fn\.norm\.g", "generator.mid.attn.norm.gain"),
    (r"mid_attn\.fn\.fn\.to_qkv\.weight", "generator.mid.attn.to_qkv.weight"),
    (r"mid_attn\.fn\.fn\.to_out\.(weight|bias)", r"generator.mid.attn.to_out.\1"),
)

# Containers of ResNet blocks: reference prefix pattern -> our prefix template.
_RESBLOCK_PARENTS = (
    (r"(down|up)s\.(\d+)\.([01])\.", r"generator.\1.\2.blocks.\3."),
    (r"mid_block([12])\.", r"generator.mid.res\1."),
    (r"final_res_block\.", "generator.final_block."),
)


def strip_wrapper_prefix(key: str) -> str:
    """``module.downs.0...`` -> ``downs.0...`` (any nesting of wrapper prefixes)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def reference_key_to_ours(key: str) -> str | None:
    """Our FTrigen name of one reference ``Unet`` state-dict name (wrapper prefixes allowed), or None."""
    key = strip_wrapper_prefix(key)
    for pattern, repl in _TOP_RULES:
        if re.fullmatch(pattern, key):
            return re.sub(f"^{pattern}$", repl, key)
    for parent, parent_repl in _RESBLOCK_PARENTS:
        m = re.match(parent, key)
        if not m:
            continue
        rest = key[m.end():]
        for pattern, repl in _RESBLOCK_RULES:
            if re.fullmatch(pattern, rest):
                return m.expand(parent_repl) + re.sub(f"^{pattern}$", repl, rest)
    return None


def convert_reference_state_dict(reference: Mapping[str, torch.Tensor],
                                 target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a reference ``Unet`` state dict onto ``target`` (an FTrigen state dict giving names and shapes).

    Every reference tensor must map to a target name of the same shape, and every ``generator.*`` /
    ``decoder.*`` tensor of the target must be covered; anything else is a WeightsError listing the
    offending names. Target tensors outside the generator and decoder (renderer buffers, derived from
    the config) are taken from ``target``. Values are returned as CPU tensors of their stored dtype.
    """
    out: dict[str, torch.Tensor] = {}
    unknown, mis_shaped, duplicated = [], [], []
    seen_mis_shaped: set[str] = set()
    for ref_key, value in reference.items():
        ours = reference_key_to_ours(ref_key)
        if ours is None or ours not in target:
            unknown.append(ref_key if ours is None else f"{ref_key} (-> {ours}, not in this model)")
            continue
        if ours in out:
            duplicated.append(f"{ref_key} (-> {ours})")
            continue
        if tuple(value.shape) != tuple(target[ours].shape):
            mis_shaped.append(f"{ref_key}: {tuple(value.shape)} vs {ours} {tuple(target[ours].shape)}")
            seen_mis_shaped.add(ours)
            continue
        out[ours] = value.detach().to("cpu")
    learned = [k for k in target if k.startswith(("generator.", "decoder."))]
    missing = sorted(k for k in learned if k not in out and k not in seen_mis_shaped)
    if unknown or missing or mis_shaped or duplicated:
        parts = []
        for label, items in (("unknown reference tensors", unknown),
                             ("model tensors missing from the checkpoint", missing),
                             ("shape mismatches", mis_shaped),
                             ("duplicates after removing wrapper prefixes", duplicated)):
            if items:
                parts.append(f"{len(items)} {label}: " + ", ".join(sorted(items)))
        raise WeightsError("the reference state dict does not match f_trigen at this config (check model.* and "
                           "data.resolution against the checkpoint's training setup); " + "; ".join(parts))
    for key, value in target.items():
        if key not in out:
            out[key] = value.detach().to("cpu").clone()
    return out


class _Opaque:
    """Stands in for an object of the checkpoint that is not needed (optimizer or scheduler internals)."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> "_Opaque":
        return _Opaque()


def _opaque_getattr(*args: Any) -> _Opaque:
    # Bound methods (e.g. an old OneCycleLR's anneal function) are pickled as getattr(obj, name).
    return _Opaque()


def _data_globals() -> dict[tuple[str, str], Any]:
    """Globals a tensor checkpoint legitimately needs: tensor rebuilding, dtypes, plain containers."""
    allowed: dict[tuple[str, str], Any] = {}
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state"):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    allowed[("torch._tensor", "_rebuild_from_type_v2")] = torch._tensor._rebuild_from_type_v2
    allowed[("torch", "Tensor")] = torch.Tensor
    allowed[("torch.nn.parameter", "Parameter")] = torch.nn.Parameter
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch", "device")] = torch.device
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    allowed[("collections", "OrderedDict")] = collections.OrderedDict
    allowed[("collections", "defaultdict")] = collections.defaultdict
    for name in ("set", "frozenset", "tuple", "list", "dict", "int", "float", "complex", "bool", "bytearray",
                 "slice", "range"):
        allowed[("builtins", name)] = getattr(builtins, name)
    allowed[("builtins", "getattr")] = _opaque_getattr
    return allowed


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles tensors and plain containers; every other global becomes an inert :class:`_Opaque` stand-in.

    No module outside the allow-list is imported and no callable outside it is called, so reading a file
    runs none of its code. Used when ``weights_only`` refuses a checkpoint because its optimizer or
    scheduler state holds Python objects; the model weights never need them.
    """

    allowed = _data_globals()

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles (torch.save's default) name Python 2 modules, e.g. __builtin__.dict.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        type(self).replaced.add(f"{module}.{name}")
        return type(name, (_Opaque,), {})


_DataOnlyUnpickler.replaced = set()
_data_only_pickle = types.ModuleType("g3dr_data_only_pickle")
_data_only_pickle.Unpickler = _DataOnlyUnpickler
_data_only_pickle.load = lambda f, **kwargs: _DataOnlyUnpickler(f, **kwargs).load()


def read_reference_checkpoint(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """``(model_state_dict, step)`` of a reference ``checkpoint_generic.pt``.

    Loads with ``weights_only=True``. When that refuses the file (optimizer or scheduler state holding
    Python objects, e.g. accelerate's wrappers or an old OneCycleLR's bound method), it is read again with
    a data-only unpickler that replaces every object outside tensors and plain containers by an inert
    stand-in; no code from the file runs either way. ``allow_pickle`` instead unpickles fully (runs code
    from the file, needs every referenced package installed): only for trusted files, as a last resort.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"reference checkpoint {path} does not exist (the G3DR release's checkpoint_generic.pt)")
    try:
        if allow_pickle:
            data = torch.load(str(path), map_location="cpu", weights_only=False)
        else:
            try:
                data = torch.load(str(path), map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as err:
                log.info("weights_only loading refused %s (%s); reading it with the data-only unpickler",
                         path.name, str(err).splitlines()[0])
                _DataOnlyUnpickler.replaced = set()
                data = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_data_only_pickle)
                if _DataOnlyUnpickler.replaced:
                    log.info("ignored objects of types %s (not part of the model weights)",
                             ", ".join(sorted(_DataOnlyUnpickler.replaced)))
    except Exception as err:  # noqa: BLE001 - torch.load raises anything (KeyError, SafetensorError, ...) for junk
        raise WeightsError(_unreadable(path, err, allow_pickle)) from None
    if isinstance(data, dict) and "model" in data and isinstance(data["model"], Mapping):
        state, step = data["model"], data.get("step", 0)
    else:
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise WeightsError(f"{path} is not a G3DR reference training checkpoint: expected a dict with 'step', "
                           f"'model', 'opt', 'scheduler', found {found}")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: model entries that are not tensors: {', '.join(map(str, bad))}")
    try:
        step = int(step)
    except (TypeError, ValueError):
        raise WeightsError(f"{path}: 'step' is not an integer ({step!r})") from None
    return dict(state), step


def _unreadable(path: Path, err: BaseException, allow_pickle: bool) -> str:
    """One line for a ``src`` that torch cannot load: what the file looks like, and what to give instead."""
    with open(path, "rb") as f:
        head = f.read(16)
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    cause = f"{type(err).__name__}: {first}" if first else type(err).__name__
    expected = "expected the G3DR release's checkpoint_generic.pt (a torch.save file)"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # a torch zip archive or a legacy pickle: damaged or foreign
        hint = "" if allow_pickle else "; if it comes from a trusted source, --allow-pickle unpickles it fully"
        return f"{path} is a torch/pickle file that cannot be read as a checkpoint ({cause}){hint}"
    try:
        from g3dr.models.checkpoint_io import read_f_trigen_metadata

        read_f_trigen_metadata(path)
    except Exception:  # noqa: BLE001 - not ours either
        pass
    else:
        return f"{path} is already a g3dr f_trigen checkpoint: no import needed, use it as it is"
    if head[:8].isascii() and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return f"{path} is a text file, not a torch checkpoint; {expected}"
    return f"{path} is not a torch checkpoint (first bytes {head[:8].hex()}); {expected}"


def import_official(src: str | Path, dst: str | Path, cfg: Config, allow_pickle: bool = False) -> dict[str, Any]:
    """Convert the reference checkpoint ``src`` into our checkpoint ``dst`` for the model of ``cfg``.

    ``cfg`` must use the EG3D plane convention (the reference's). Returns a summary dict
    (step, tensor and parameter counts).
    """
    from g3dr.models.checkpoint_io import save_f_trigen
    from g3dr.models.f_trigen import FTrigen

    if cfg.renderer.plane_convention != "eg3d":
        raise ConfigError("renderer.plane_convention must be 'eg3d' for reference checkpoints (the reference "
                          f"projects onto xy, xz, zx), got {cfg.renderer.plane_convention!r}")
    reference, step = read_reference_checkpoint(src, allow_pickle=allow_pickle)
    model = FTrigen(cfg)
    state = convert_reference_state_dict(reference, model.state_dict())
    model.load_state_dict(state, strict=True)
    save_f_trigen(model, cfg, dst, step=step, source="import-official",
                  extra_metadata={"imported_from": Path(src).name})
    n_params = sum(p.numel() for p in model.parameters())
    log.info("imported %s (step %d, %d tensors, %d parameters) -> %s", src, step, len(reference), n_params, dst)
    return {"step": step, "tensors": len(reference), "parameters": n_params}
