"""The G3DR training task: one forward of f_trigen (through its engine) plus the weighted objective.

Per micro-batch (paper S.1, S.2; reference ``train.py``):

- choose the view by Eq. 1: canonical if ``r > min(tau, 2 * step / total_steps)``, ``r ~ U(0, 1)``;
- render it: the canonical view with the pseudo-depth handed to the renderer (depth-prior fine samples;
  the depth kernel with ``loss.depth_supervision: kernel``), a novel view from the novel-view schedule;
- add the terms of that view, each weighted by its schedule at ``step`` (``loss.canonical.*`` /
  ``loss.novel.*``, :class:`~g3dr.config.WeightSchedule`); a term whose weight is 0 at ``step`` is not
  computed. Canonical: ``l1`` (render vs input), ``depth`` (the geometry term of ``depth_supervision``: L1
  of the accumulated depth vs the pseudo-depth, or DS-NeRF's KL term on the ray weights), ``perceptual``
  (LPIPS-VGG on the view's block weights), ``clip``, ``weight_sum``. Novel: ``clip`` (CLIP embedding L1 vs
  the input's), ``tv`` (of the depth map), ``perceptual``, ``weight_sum``.

Precision: only the U-Net input takes the model dtype (bf16 in the paper preset). The pseudo-depth and the
cameras reach the renderer in float32, and losses are computed in float32: in bf16 a depth of 4.99 reads
5.0, which moves the kernel's centre and the depth-prior window, and novel camera positions move by ~0.008.

The task draws its randomness (``r``, novel cameras; the renderer's jitter) from the global torch RNG,
which the trainer seeds per rank and saves in every checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch

from g3dr.config import Config
from g3dr.losses import Critics, depth_l1_loss, kl_depth_loss, l1_loss, tv_loss, weight_sum_loss
from g3dr.render.cameras import camera_to_world_from_angles, canonical_angles, sample_novel_angles
from g3dr.train.schedules import is_canonical


class G3DRTask:
    """Holds the frozen critics and the loss config; ``__call__(model, batch, step) -> (loss, report)``."""

    def __init__(self, cfg: Config, critics: Critics, model_dtype: torch.dtype = torch.float32):
        self.cfg = cfg
        self.critics = critics
        self.model_dtype = model_dtype  # the U-Net input's dtype; geometry and losses stay float32
        n = critics.vgg.num_layers
        for view in ("canonical", "novel"):
            layers = getattr(cfg.loss, view).perceptual.layers
            if len(layers) != n and not getattr(cfg.loss, view).perceptual.always_zero:
                raise ValueError(f"loss.{view}.perceptual.layers has {len(layers)} block weights, the perceptual "
                                 f"critic has {n} blocks")

    def choose_view(self, step: int, batch: int, device: torch.device) -> tuple[bool, float, torch.Tensor]:
        """Eq. 1 and the camera of the chosen view: ``(canonical, r, cam2world (B, 4, 4))``."""
        total, cam = self.cfg.train.total_steps, self.cfg.camera
        r = float(torch.rand(()))
        canonical = is_canonical(r, step, total, self.cfg.loss.tau)
        if canonical:
            yaw, pitch = canonical_angles(batch, cam, device=device)
        else:
            yaw, pitch = sample_novel_angles(batch, step / total, cam, device=device)
        return canonical, r, camera_to_world_from_angles(yaw, pitch, cam.radius)

    def weights_at(self, step: int, canonical: bool) -> dict[str, float]:
        """The weight of every term of the view at ``step`` (0 for terms that are off)."""
        terms = self.cfg.loss.canonical if canonical else self.cfg.loss.novel
        total = self.cfg.train.total_steps
        return {name: getattr(terms, name).at(step, total) for name in type(terms).__dataclass_fields__}

    def __call__(self, model: Any, batch: dict[str, Any], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Forward ``model`` (FTrigen or its engine) on one micro-batch at optimizer step ``step``.

        Returns the weighted total loss (a differentiable scalar) and a report: each computed unweighted
        term (``loss/<view>/<name>``, view ``canonical`` or ``novel``), its weight (``weight/<view>/<name>``),
        ``loss/total``, ``canonical`` and the Eq. 1 draw ``view_r`` (no tensors: f_trigen's image grid renders
        its own views).
        """
        loss_cfg = self.cfg.loss
        rgb, depth = batch["rgb"], batch["depth"]
        canonical, r, cam2world = self.choose_view(step, rgb.shape[0], rgb.device)
        weights = {k: w for k, w in self.weights_at(step, canonical).items() if w > 0}
        kl = canonical and loss_cfg.depth_supervision == "kl" and "depth" in weights
        out = model(rgb.to(self.model_dtype), depth.float(), cam2world.float(), canonical, sample_weights=kl)
        render = out["rgb"].float()
        terms: dict[str, torch.Tensor] = {}
        views = loss_cfg.canonical if canonical else loss_cfg.novel
        for name in weights:
            match name:
                case "l1":
                    terms[name] = l1_loss(render, rgb.float())
                case "depth" if kl:
                    rays = depth.float().permute(0, 2, 3, 1).reshape(depth.shape[0], -1, 1)
                    terms[name] = kl_depth_loss(out["sample_weights"].float(), out["sample_depths"], rays,
                                                loss_cfg.kl_sigma)
                case "depth":
                    terms[name] = depth_l1_loss(out["depth"].float(), depth.float())
                case "perceptual":
                    terms[name] = self.critics.vgg(render, rgb.float(), views.perceptual.layers)
                case "clip":
                    with torch.no_grad():
                        target = self.critics.clip(rgb.float())
                    terms[name] = (self.critics.clip(render) - target).abs().mean()
                case "tv":
                    terms[name] = tv_loss(out["depth"].float())
                case "weight_sum":
                    terms[name] = weight_sum_loss(out["weight_sum"].float())
                case _:
                    raise ValueError(f"unknown loss term {name!r}")
        total = sum(weights[k] * terms[k] for k in terms) if terms else render.sum() * 0.0
        view = "canonical" if canonical else "novel"
        report: dict[str, Any] = {f"loss/{view}/{k}": float(v.detach()) for k, v in terms.items()}
        report.update({f"weight/{view}/{k}": float(w) for k, w in weights.items()})
        report["loss/total"] = float(total.detach())
        report["canonical"] = canonical
        report["view_r"] = r
        return total, report

