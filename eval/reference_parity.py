"""Reference parity: render one RGB-D image with the G3DR reference code and with ours, and compare.

This is the done-criterion check of issue 4: the renders of an imported reference checkpoint must equal
the reference code's renders of the same weights on the same image and depth (max abs difference
<= 1e-4 in float32, deterministic mode). Nothing of the reference code is part of this project: the
check imports it at run time from checkouts the user provides:

    python -m g3dr.eval.reference_parity --g3dr-src ~/src/G3DR --eg3d-src ~/src/eg3d/eg3d \\
        --checkpoint checkpoint_generic.pt --image cat.jpg --depth cat_depth.png [--device cuda]

(``--eg3d-src`` is the folder holding ``training/volumetric_rendering``.) Without ``--checkpoint`` a
randomly initialised reference model at the config's architecture is built and saved in the reference
format first, so the whole path (reference save -> ``import_official`` -> ``load_f_trigen`` -> render)
is exercised. The reference needs ``einops``; its training-only imports (lpips, clip, accelerate,
tensorboard, ...) are replaced by empty stand-ins because rendering never touches them.

What is compared, per view (the canonical view and novel views at ``--novel-yaw`` offsets):

- ``deterministic``: ours with ``renderer.deterministic=true`` vs the reference with zero stratified
  jitter and ``sample_pdf(det=True)``;
- ``seeded``: ours in random mode vs the reference, both on the global RNG seeded identically
  (our sampling draws the reference's random numbers in the reference's order).

Renders are made without the depth prior, as the reference's ``visualize.py`` does. Exit status 0 when
every max abs difference (rgb, depth, weight sum) is <= ``--tol``, 1 otherwise. Must not be imported by
library code (it imports third-party research code from user paths).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import tempfile
import types
from pathlib import Path

_TRAINING_ONLY_MODULES = ("lpips", "clip", "click", "prettytable", "requests", "matplotlib", "imageio")


class _Placeholder:
    """Stands in for classes of training-only dependencies the reference imports at module level."""

    def __init__(self, *args, **kwargs):
        pass


def _stub(name: str, **attrs) -> None:
    if name in sys.modules:
        return
    try:
        __import__(name)
        return
    except ImportError:
        pass
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def import_reference(g3dr_src: Path, eg3d_src: Path) -> types.SimpleNamespace:
    """Import the reference modules from user checkouts; returns the pieces the parity check needs."""
    for path, marker in ((g3dr_src, "train.py"), (g3dr_src, "src/unet.py"),
                         (eg3d_src, "training/volumetric_rendering/renderer.py")):
        if not (path / marker).is_file():
            raise SystemExit(f"error: {path / marker} not found; pass the right --g3dr-src / --eg3d-src")
    try:
        import einops  # noqa: F401
    except ImportError:
        raise SystemExit("error: the reference U-Net needs einops: pip install einops") from None
    for name in _TRAINING_ONLY_MODULES:
        _stub(name, PrettyTable=_Placeholder)
    _stub("omegaconf", DictConfig=dict, OmegaConf=_Placeholder)
    _stub("accelerate", Accelerator=_Placeholder)
    _stub("torch.utils.tensorboard", SummaryWriter=_Placeholder)
    if "distutils.util" not in sys.modules:
        try:
            import distutils.util  # noqa: F401
        except ImportError:
            _stub("distutils")
            _stub("distutils.util", strtobool=lambda value: value)
    _stub("src.dataio", Imagenet_Dataset=_Placeholder)  # its dataset pulls in data-loading dependencies
    sys.path[:0] = [str(g3dr_src), str(eg3d_src)]
    import src.unet as unet
    import train
    from src.camera import compute_cam2world_matrix, sample_rays
    from src.utils import TensorGroup
    from training.volumetric_rendering import math_utils
    from training.volumetric_rendering.renderer import (
        ImportanceRenderer,
        project_onto_planes,
        sample_from_3dgrid,
        sample_from_planes,
    )

    renderer_cls = train.extend_render(ImportanceRenderer, sample_from_planes, sample_from_3dgrid,
                                       project_onto_planes, math_utils)
    return types.SimpleNamespace(unet=unet, train=train, renderer_cls=renderer_cls, TensorGroup=TensorGroup,
                                 compute_cam2world_matrix=compute_cam2world_matrix, sample_rays=sample_rays)


def build_reference_model(ref, cfg):
    """The reference ``Unet`` (with its decoder and renderer) at the architecture of ``cfg``."""
    m = cfg.model
    if m.num_res_blocks != 2 or m.attn_heads != 4 or m.attn_head_dim != 32 or m.decoder_hidden != 64:
        raise SystemExit("error: the reference U-Net fixes 2 ResNet blocks, 4 x 32 attention heads and a 64-wide "
                         "decoder; use a config with those values")
    ref.unet.pos_channels = m.pos_emb_channels  # a module-level constant in the reference
    options = rendering_options(cfg)
    decoder = ref.unet.OSGDecoder_extended(m.triplane_channels, options={
        "decoder_lr_mul": m.decoder_lr_mul, "decoder_output_dim": 3, "decoder_time_feature": False})
    return ref.unet.Unet(channels=4, dim=m.base_width, out_dim=m.triplane_channels * 3, renderer=ref.renderer_cls(),
                         eg3d_decoder=decoder, rendering_options=options, dim_mults=tuple(m.channel_mults),
                         resnet_block_groups=m.norm_groups, render_3d=True, image_size=cfg.data.resolution)


def rendering_options(cfg) -> dict:
    r = cfg.renderer
    return {"ray_start": "auto", "ray_end": "auto", "box_warp": r.box_warp, "depth_resolution": r.num_coarse,
            "depth_resolution_importance": r.num_fine, "disparity_space_sampling": False, "clamp_mode": "softplus"}


@contextlib.contextmanager
def reference_deterministic(ref_renderer, torch):
    """Zero stratified jitter and evenly spaced inverse-CDF samples in the reference renderer."""
    sample_pdf, rand_like = ref_renderer.sample_pdf, torch.rand_like
    ref_renderer.sample_pdf = lambda bins, w, n, det=False, eps=1e-5: sample_pdf(bins, w, n, det=True, eps=eps)
    torch.rand_like = torch.zeros_like
    try:
        yield
    finally:
        ref_renderer.sample_pdf, torch.rand_like = sample_pdf, rand_like


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m g3dr.eval.reference_parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--g3dr-src", type=Path, required=True, help="checkout of github.com/preddy5/G3DR")
    parser.add_argument("--eg3d-src", type=Path, required=True, help="the eg3d/ folder of github.com/NVlabs/eg3d")
    parser.add_argument("--checkpoint", type=Path, help="reference checkpoint_generic.pt (default: random weights)")
    parser.add_argument("--image", type=Path, help="input photo (default: a random image)")
    parser.add_argument("--depth", type=Path, help="its 16-bit release depth PNG")
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "imagenet128.yaml"),
                        help="config of the architecture and renderer (default: configs/imagenet128.yaml)")
    parser.add_argument("--impl", choices=["reference", "fused"], default="reference", help="our renderer path")
    parser.add_argument("--novel-yaw", default="0.3,-0.2", help="comma list of yaw offsets of the novel views")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--allow-pickle", action="store_true", help="passed to import_official for old checkpoints")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    args = parser.parse_args(argv)

    import torch

    from g3dr.config import load_config
    from g3dr.models.checkpoint_io import load_f_trigen
    from g3dr.models.reference_import import import_official
    from g3dr.render import camera_to_world_from_angles, canonical_angles

    ref = import_reference(args.g3dr_src.resolve(), args.eg3d_src.resolve())
    cfg = load_config(args.config, [*args.overrides, "renderer.impl=reference", "renderer.plane_convention=eg3d"])
    res = cfg.data.resolution
    device = torch.device(args.device)
    workdir = Path(tempfile.mkdtemp(prefix="g3dr-parity-"))
    torch.manual_seed(args.seed)
    ref_model = build_reference_model(ref, cfg)
    if args.checkpoint is None:
        args.checkpoint = workdir / "checkpoint_generic.pt"
        torch.save({"step": 0, "model": {f"module.{k}": v for k, v in ref_model.state_dict().items()},
                    "opt": {}, "scheduler": {}}, args.checkpoint)
        print(f"random reference weights saved to {args.checkpoint}")
    ours_path = workdir / "imported.safetensors"
    import_official(args.checkpoint, ours_path, cfg, allow_pickle=args.allow_pickle)
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=not args.allow_pickle)["model"]
    ref_model.load_state_dict({k.partition("module.")[2] or k: v for k, v in state.items()})
    ref_model.to(device).eval()

    if args.image is not None:
        from g3dr.models.inference import load_rgbd

        rgb, depth = load_rgbd(args.image, args.depth, res, cfg.data.depth_scale, cfg.data.depth_offset)
    else:
        gen = torch.Generator().manual_seed(args.seed + 1)
        rgb = torch.rand(1, 3, res, res, generator=gen) * 2 - 1
        depth = 4 + 2 * torch.rand(1, 1, res, res, generator=gen)
    rgb, depth = rgb.to(device), depth.to(device)

    yaw0, pitch0 = canonical_angles(1, cfg.camera)
    views = [("canonical", yaw0, pitch0)] + [(f"yaw{dy:+.2f}", yaw0 + dy, pitch0) for dy in
                                                    (float(v) for v in args.novel_yaw.split(",") if v.strip())]
    worst = 0.0
    with torch.no_grad():
        ref_planes = ref_model(torch.cat([rgb, depth], 1), return_3d_features=True, render=False)[3]
        for mode in ("deterministic", "seeded"):
            overrides = [f"renderer.impl={args.impl}", f"renderer.deterministic={str(mode == 'deterministic').lower()}"]
            model, mcfg, _ = load_f_trigen(ours_path, device=device, overrides=overrides)
            planes = model.make_planes(rgb, depth)
            for name, yaw, pitch in views:
                params = ref.TensorGroup(angles=torch.stack([yaw, pitch, torch.zeros(1)], 1), radius=torch.ones(1) * 5,
                                         look_at=torch.zeros(1, 3))
                c2w = ref.compute_cam2world_matrix(params).to(device)
                ray_o, ray_d = ref.sample_rays(c2w, torch.ones(1, 1, device=device) * cfg.camera.fov_degrees, [res, res])
                cm = reference_deterministic(ref_model.renderer, torch) if mode == "deterministic" else contextlib.nullcontext()
                with cm:
                    torch.manual_seed(args.seed + 7)
                    x, d, w, _ = ref_model.renderer(ref_planes, ref_model.decoder, ray_o, ray_d, ref_model.rendering_options)
                torch.manual_seed(args.seed + 7)
                ours = model.render(planes, camera_to_world_from_angles(yaw, pitch, mcfg.camera.radius).to(device),
                                    canonical=name == "canonical")

                def image(t):
                    return t.permute(0, 2, 1).reshape(1, -1, res, res)

                diffs = {"planes": (planes - ref_planes).abs().max().item(),
                         "rgb": (ours["rgb"] - image(x)).abs().max().item(),
                         "depth": (ours["depth"] - image(d)).abs().max().item(),
                         "weight_sum": (ours["weight_sum"] - image(w)).abs().max().item()}
                worst = max(worst, diffs["rgb"], diffs["depth"], diffs["weight_sum"])
                print(f"{mode:13s} {name:10s} " + "  ".join(f"{k} {v:.2e}" for k, v in diffs.items()), flush=True)
    ok = math.isfinite(worst) and worst <= args.tol
    print(f"max abs difference of the renders: {worst:.3e} ({'<=' if ok else '>'} tol {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
