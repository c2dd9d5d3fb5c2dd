"""Slow, independent float64 reference of 3DGP's NFS depth maps and score, for tests only.

Written from the formulas of 3DGP (snap-research/3dgp): ``MipRayMarcher2`` with the rendering option
``cut_quantile`` and ``ImportanceRenderer.forward`` (``src/training/tri_plane_renderer.py``), and
``compute_flatness_score`` (``src/metrics/non_flatness_score.py``), with Python floats and loops. It shares
no code with ``g3dr`` (the ray/box, stratified and inverse-CDF steps come from the independent
``render_reference`` helper). One difference from 3DGP, as in g3dr: the quantile of the cut is taken over
one image's densities (3DGP: over a rendering chunk).

The marcher, for one image of R rays with S sorted samples each (intervals i = 0 .. S - 2):

- midpoints: ``t_i = (d_i + d_{i+1}) / 2``, ``c_i``, ``raw_i`` likewise; ``delta_i = d_{i+1} - d_i``;
- ``sigma_i = softplus(raw_i + density_bias) * sigma_scale`` (g3dr's sweep factor, 1 in 3DGP);
- cut: ``sigma_i = 0`` where ``sigma_i < quantile(all R (S - 1) sigmas of the image, q)``; the quantile as
  ``torch.quantile`` (linear): position ``q (n - 1)`` in the sorted values, interpolated between its
  neighbours;
- ``alpha_i = 1 - exp(-sigma_i delta_i)``; ``w_i = alpha_i prod_{j<i}(1 - alpha_j + 1e-10)``;
- ``depth = sum_i w_i t_i`` (NOT divided by ``sum w``); ``rgb = 2 sum_i w_i c_i - 1``.

NFS: each map clamped to [near, far]; ``torch.histc`` bins (bin ``int((x - near) / (far - near) * bins)``,
the value ``far`` in the last bin); ``p = h / sum h``; ``H = -sum log(p + 1e-12) p``; NFS = mean exp(H).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from g3dr_test_support import load_test_helper

F64 = torch.float64
render_reference = load_test_helper("render_reference")


def softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def quantile_linear(values: list[float], q: float) -> float:
    """``torch.quantile(values, q)`` (interpolation 'linear'), from its definition."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def march_image(colors, raw, depths, *, density_bias: float = -1.0, sigma_scale: float = 1.0,
                cut_quantile: float = 0.0) -> dict[str, torch.Tensor]:
    """3DGP's marcher on one image: colors (R, S, 3), raw (R, S), depths (R, S), each sorted along S.

    Returns float64 tensors: ``rgb`` (R, 3), ``depth`` (R,) = sum(w t), ``weights`` (R, S - 1),
    ``weight_sum`` (R,), ``sigma`` (R, S - 1) after the cut.
    """
    colors, raw, depths = (torch.as_tensor(x, dtype=F64).tolist() for x in (colors, raw, depths))
    n_rays, n_samples = len(depths), len(depths[0])
    sigma = [[softplus((raw[r][i] + raw[r][i + 1]) / 2 + density_bias) * sigma_scale for i in range(n_samples - 1)]
             for r in range(n_rays)]
    if cut_quantile > 0.0:
        threshold = quantile_linear([s for ray in sigma for s in ray], cut_quantile)
        sigma = [[0.0 if s < threshold else s for s in ray] for ray in sigma]
    rgb, depth, weights, weight_sum = [], [], [], []
    for r in range(n_rays):
        transmittance, ray_w = 1.0, []
        ray_rgb, ray_depth = [0.0, 0.0, 0.0], 0.0
        for i in range(n_samples - 1):
            alpha = 1.0 - math.exp(-sigma[r][i] * (depths[r][i + 1] - depths[r][i]))
            w = alpha * transmittance
            transmittance *= 1.0 - alpha + 1e-10
            ray_w.append(w)
            ray_depth += w * (depths[r][i] + depths[r][i + 1]) / 2
            for k in range(3):
                ray_rgb[k] += w * (colors[r][i][k] + colors[r][i + 1][k]) / 2
        rgb.append([2 * x - 1 for x in ray_rgb])
        depth.append(ray_depth)
        weights.append(ray_w)
        weight_sum.append(sum(ray_w))
    return {name: torch.tensor(value, dtype=F64) for name, value in
            (("rgb", rgb), ("depth", depth), ("weights", weights), ("weight_sum", weight_sum), ("sigma", sigma))}


Decode = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``decode(points (N, 3), directions (N, 3)) -> (colors (N, 3), raw densities (N,))`` in float64."""


def decoder_on_triplane(planes: torch.Tensor, decoder, resolutions, axes, box_warp: float = 2.0) -> Decode:
    """A :data:`Decode` for one triplane (3, C, H, W): features summed over the antialiased levels at
    ``resolutions`` and averaged over planes (``render_reference.triplane_features``), then ``decoder``
    (the model's, called as ``decoder(features (1, N, C), coordinates (1, N, 3), directions (1, N, 3))``)."""
    planes = planes.to(F64)
    levels = [planes] + [torch.nn.functional.interpolate(planes, size=(r, r), mode="bilinear", antialias=True)
                         for r in resolutions[1:]]

    def decode(points: torch.Tensor, directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        unit = points * (2 / box_warp)
        features = torch.stack([render_reference.triplane_features(levels, p, axes) for p in unit])
        with torch.no_grad():
            rgb, sigma = decoder(features[None], unit[None], directions[None])
        return rgb[0], sigma[0, :, 0]

    return decode


def render_image(decode: Decode, origins: torch.Tensor, directions: torch.Tensor, *, num_coarse: int, num_fine: int,
                 box_warp: float = 2.0, density_bias: float = -1.0, sigma_scale: float = 1.0,
                 cut_quantile: float = 0.0) -> dict[str, torch.Tensor]:
    """3DGP's ``ImportanceRenderer.forward`` for one image, deterministic (no jitter, ``det=True``).

    Rays (R, 3) in float64. Coarse samples linspace(near, far) over the ray-box interval; the marcher
    *with the cut* on the coarse samples of the whole image gives the weights that place ``num_fine``
    importance samples per ray (EG3D's max-pool / avg-pool + 0.01 smoothing, bins at the coarse
    midpoints, inverse CDF at ``linspace(0, 1)``); coarse and fine samples merged in depth order; the
    marcher with the cut again. Returns :func:`march_image`'s outputs plus ``depths`` (R, S).
    """
    n_rays = origins.shape[0]

    def decode_rays(ts: list[list[float]]) -> tuple[list, list]:
        points = torch.stack([origins[r] + t * directions[r] for r in range(n_rays) for t in ts[r]])
        dirs = torch.stack([directions[r] for r in range(n_rays) for _ in ts[r]])
        colors, raw = decode(points, dirs)
        per_ray = len(ts[0])
        return (colors.view(n_rays, per_ray, 3).tolist(), raw.reshape(n_rays, per_ray).tolist())

    march = dict(density_bias=density_bias, sigma_scale=sigma_scale, cut_quantile=cut_quantile)
    coarse = []
    for r in range(n_rays):
        near, far, hit = render_reference.ray_box(origins[r], directions[r], box_warp / 2)
        if not hit:
            raise ValueError("the reference renders rays that hit the box only")
        coarse.append(render_reference.stratified(near, far, num_coarse, None))
    coarse_colors, coarse_raw = decode_rays(coarse)
    if num_fine == 0:
        out = march_image(coarse_colors, coarse_raw, coarse, **march)
        out["depths"] = torch.tensor(coarse, dtype=F64)
        return out
    coarse_weights = march_image(coarse_colors, coarse_raw, coarse, **march)["weights"].tolist()
    us = [i / (num_fine - 1) for i in range(num_fine)] if num_fine > 1 else [0.0]
    fine = []
    for r in range(n_rays):
        mids = [(a + b) / 2 for a, b in zip(coarse[r][:-1], coarse[r][1:], strict=True)]
        smooth = render_reference.smooth_weights(coarse_weights[r])
        fine.append(render_reference.inverse_cdf(mids, smooth[1:-1], us))
    fine_colors, fine_raw = decode_rays(fine)
    depths, colors, raw = [], [], []
    for r in range(n_rays):
        merged = sorted(zip(coarse[r] + fine[r], coarse_colors[r] + fine_colors[r], coarse_raw[r] + fine_raw[r],
                            strict=True), key=lambda sample: sample[0])
        depths.append([m[0] for m in merged])
        colors.append([m[1] for m in merged])
        raw.append([m[2] for m in merged])
    out = march_image(colors, raw, depths, **march)
    out["depths"] = torch.tensor(depths, dtype=F64)
    return out


def non_flatness_score(depth_maps: list[list[float]], near: float, far: float, bins: int = 64) -> float:
    """3DGP's NFS of N depth maps (each a flat list of pixel depths)."""
    scores = []
    for depth_map in depth_maps:
        counts = [0] * bins
        for x in depth_map:
            x = min(max(x, near), far)
            index = int((x - near) / (far - near) * bins)
            counts[min(index, bins - 1)] += 1
        total = sum(counts)
        entropy = -sum(math.log(c / total + 1e-12) * (c / total) for c in counts)
        scores.append(math.exp(entropy))
    return sum(scores) / len(scores)
