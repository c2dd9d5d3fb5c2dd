"""The training task: geometry precision, the three geometry supervisions of Table S1, per-view schedules."""

from __future__ import annotations

import math

import pytest
import torch

from g3dr.config import load_config
from g3dr.losses import build_critics, kl_depth_loss
from g3dr.models import FTrigen
from g3dr.train.task import G3DRTask


@pytest.fixture(scope="module")
def critics():
    return build_critics(load_config("configs/tiny.yaml").loss)


def batch(n=2, res=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Depths a bf16 mantissa cannot hold (4.99 rounds to 5.0): the precision test must see them survive.
    depth = 4.99 + 0.002 * torch.rand(n, 1, res, res, generator=gen, dtype=torch.float64)
    return {"rgb": torch.rand(n, 3, res, res, generator=gen) * 2 - 1, "depth": depth.float()}


class Recorder(torch.nn.Module):
    """Stands in for the engine: records what reaches the model, renders nothing (bf16 would not run on CPU)."""

    def forward(self, rgb, depth, cam2world, canonical, sample_weights=False):
        self.seen = {"rgb": rgb, "depth": depth, "cam2world": cam2world}
        b, _, h, w = rgb.shape
        zeros = torch.zeros(b, 1, h, w, requires_grad=True)
        return {"rgb": rgb.float().detach().requires_grad_(), "depth": zeros + 5.0, "weight_sum": zeros + 1.0}


@pytest.mark.parametrize("view_step, tau", [(0, 1.0), (10, 1.0)])  # step 0: canonical (threshold 0)
def test_geometry_reaches_the_renderer_in_float32(critics, view_step, tau):
    """Only the U-Net input takes the model dtype: the pseudo-depth (kernel centre, prior window) and the
    cameras stay float32 in a bf16 run (the old cast rounded 4.99 to 5.0 and moved novel cameras)."""
    cfg = load_config("configs/tiny.yaml", [f"loss.tau={tau}", "train.total_steps=20"])
    task = G3DRTask(cfg, critics, model_dtype=torch.bfloat16)
    model, b = Recorder(), batch()
    torch.manual_seed(3)
    _, report = task(model, b, view_step)
    seen = model.seen
    assert seen["rgb"].dtype == torch.bfloat16
    assert seen["depth"].dtype == torch.float32 and torch.equal(seen["depth"], b["depth"])
    assert seen["cam2world"].dtype == torch.float32
    torch.manual_seed(3)
    _, _, cam2world = task.choose_view(view_step, 2, torch.device("cpu"))
    assert torch.equal(seen["cam2world"], cam2world)
    assert report["canonical"] == (view_step == 0)


def kl_reference(weights, depths, pseudo, sigma):
    """DS-NeRF's KL term written out per ray and interval in float64 (independent of the vectorised code)."""
    w, t, d = (x.double().squeeze(-1).tolist() for x in (weights, depths, pseudo))
    total, rays = 0.0, 0
    for b in range(len(w)):
        for r in range(len(w[b])):
            ray = 0.0
            for i in range(len(w[b][r])):
                mid, delta = (t[b][r][i] + t[b][r][i + 1]) / 2, t[b][r][i + 1] - t[b][r][i]
                ray += -math.log(w[b][r][i] + 1e-5) * math.exp(-(mid - d[b][r]) ** 2 / (2 * sigma**2)) * delta
            total, rays = total + ray, rays + 1
    return total / rays


def test_kl_depth_loss_against_loops():
    gen = torch.Generator().manual_seed(1)
    depths = torch.sort(4 + 2 * torch.rand(2, 5, 9, 1, generator=gen, dtype=torch.float64), dim=2).values
    weights = torch.rand(2, 5, 8, 1, generator=gen, dtype=torch.float64) / 8
    pseudo = 4.5 + torch.rand(2, 5, 1, generator=gen, dtype=torch.float64)
    got = kl_depth_loss(weights, depths, pseudo, 0.1225)
    assert float(got) == pytest.approx(kl_reference(weights, depths, pseudo, 0.1225), rel=1e-12)
    # Its gradient pulls weight towards the pseudo-depth: d loss / d w_i = -g_i delta_i / (w_i + eps).
    w = weights.clone().requires_grad_()
    kl_depth_loss(w, depths, pseudo, 0.1225).backward()
    mids = (depths[:, :, 1:] + depths[:, :, :-1]) / 2
    g = torch.exp(-((mids - pseudo[:, :, None]) ** 2) / (2 * 0.1225**2)) * (depths[:, :, 1:] - depths[:, :, :-1])
    torch.testing.assert_close(w.grad, -g / (weights + 1e-5) / 10, rtol=1e-10, atol=0)


def _canonical_step(mode, critics, seed=0):
    cfg = load_config("configs/tiny.yaml", [f"loss.depth_supervision={mode}", "loss.tau=1.0",
                                            "renderer.deterministic=true", "renderer.impl=reference"])
    torch.manual_seed(seed)
    model = FTrigen(cfg)
    task = G3DRTask(cfg, critics)
    torch.manual_seed(5)
    loss, report = task(model, batch(n=1), 0)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return report, grads


def test_depth_supervision_modes_select_their_terms(critics):
    kernel, g_kernel = _canonical_step("kernel", critics)
    accumulated, g_acc = _canonical_step("accumulated", critics)
    kl, _ = _canonical_step("kl", critics)
    assert kernel["canonical"] and accumulated["canonical"] and kl["canonical"]
    # kernel and accumulated: the same forward (the kernel acts on gradients only), other gradients.
    assert kernel["loss/canonical/depth"] == accumulated["loss/canonical/depth"]
    assert kernel["loss/total"] == accumulated["loss/total"]
    assert not torch.allclose(g_kernel, g_acc)
    # kl: DS-NeRF's term replaces the depth L1.
    assert kl["loss/canonical/depth"] != pytest.approx(accumulated["loss/canonical/depth"])
    assert kl["loss/canonical/l1"] == pytest.approx(accumulated["loss/canonical/l1"])


def test_kl_mode_gradient_matches_its_formula_on_the_render(critics):
    """In kl mode the depth term is kl_depth_loss of the render's own weights (reference path, with grads)."""
    cfg = load_config("configs/tiny.yaml", ["loss.depth_supervision=kl", "renderer.deterministic=true"])
    torch.manual_seed(0)
    model = FTrigen(cfg)
    b = batch(n=1)
    from g3dr.render import camera_to_world_from_angles
    c2w = camera_to_world_from_angles(torch.full((1,), math.pi / 2), torch.full((1,), math.pi / 2), 5.0)
    out = model(b["rgb"], b["depth"], c2w, True, sample_weights=True)
    assert out["sample_weights"].requires_grad
    rays = b["depth"].permute(0, 2, 3, 1).reshape(1, -1, 1)
    expected = kl_reference(out["sample_weights"].detach(), out["sample_depths"], rays, cfg.loss.kl_sigma)
    assert float(kl_depth_loss(out["sample_weights"], out["sample_depths"], rays, cfg.loss.kl_sigma).detach()) == \
        pytest.approx(expected, rel=1e-5)


def test_terms_follow_their_view_schedules(critics):
    """The reference preset's recipe on the tiny model: canonical LPIPS/CLIP from T/2, opacity ramp, novel CLIP."""
    over = ["loss.canonical.perceptual={knots: [[0, 0], [0.5, 0], [0.5, 1]], unit: fraction}",
            "loss.canonical.clip={knots: [[0, 0], [0.5, 0], [0.5, 0.175]], unit: fraction}",
            "loss.canonical.weight_sum={knots: [[0, 0], [0.5, 1]], unit: fraction}",
            "loss.novel.clip=0.35", "loss.novel.weight_sum={knots: [[0, 0], [0.5, 1]], unit: fraction}",
            "train.total_steps=20", "renderer.deterministic=true"]
    torch.manual_seed(0)
    for tau, step, expected in [
        (1.0, 0, {"l1": 1.0, "depth": 2.0}),  # canonical before T/2: no LPIPS, no CLIP, opacity weight 0
        (0.0, 10, {"l1": 1.0, "depth": 2.0, "perceptual": 1.0, "clip": 0.175, "weight_sum": 1.0}),
        (1.0, 10, {"clip": 0.35, "tv": 0.1, "perceptual": 0.5, "weight_sum": 1.0}),  # novel at T/2
    ]:
        cfg = load_config("configs/tiny.yaml", [*over, f"loss.tau={tau}"])
        task = G3DRTask(cfg, critics)
        _, report = task(FTrigen(cfg), batch(n=1), step)
        view = "canonical" if report["canonical"] else "novel"
        assert {k.split("/")[-1]: v for k, v in report.items() if k.startswith(f"weight/{view}/")} == \
            pytest.approx(expected), (tau, step)
        assert {k.split("/")[-1] for k in report if k.startswith(f"loss/{view}/")} == set(expected)
