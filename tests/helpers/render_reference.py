"""Slow, independent float64 reference of the renderer and cameras, for tests only.

Written from the formulas in docs/renderer.md with Python loops and plain tensor ops; it shares no code
with ``g3dr.render``. Load it from a test with :func:`load` (tests use ``--import-mode=importlib``).
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


# ---------------------------------------------------------------- cameras
def camera_to_world(yaw: float, pitch: float, radius: float) -> torch.Tensor:
    """(4, 4): camera at the 3DGP spherical position looking at the origin, columns (right, up, back, pos)."""
    pos = torch.tensor([radius * math.sin(pitch) * math.sin(-yaw), radius * math.cos(pitch),
                        radius * math.sin(pitch) * math.cos(yaw)], dtype=F64)
    forward = -pos / pos.norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0], dtype=F64))
    right = right / right.norm()
    up = torch.linalg.cross(right, forward)
    m = torch.eye(4, dtype=F64)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = right, up / up.norm(), -forward, pos
    return m


def rays(cam2world: torch.Tensor, fov_degrees: float, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, 3) origins and unit directions, row-major, pixel grid spanning [-1, 1] corner to corner."""
    focal = 1.0 / math.tan(math.radians(fov_degrees) / 2)
    dirs = []
    for row in range(height):
        for col in range(width):
            x = -1 + 2 * col / (width - 1) if width > 1 else -1.0
            y = 1 - 2 * row / (height - 1) if height > 1 else 1.0
            d_cam = torch.tensor([x, y, -focal], dtype=F64)
            d = cam2world[:3, :3].to(F64) @ d_cam
            dirs.append(d / d.norm())
    directions = torch.stack(dirs)
    return cam2world[:3, 3].to(F64).expand_as(directions).clone(), directions


# ---------------------------------------------------------------- sampling
def ray_box(origin, direction, half: float) -> tuple[float, float, bool]:
    """Slab test for one ray: (near, far, hit)."""
    near, far = -math.inf, math.inf
    for a in range(3):
        o, d = float(origin[a]), float(direction[a])
        if d == 0.0:
            if abs(o) > half:
                return -1.0, -2.0, False
            continue
        t1, t2 = (-half - o) / d, (half - o) / d
        near, far = max(near, min(t1, t2)), min(far, max(t1, t2))
    if near > far:
        return -1.0, -2.0, False
    return near, far, True


def stratified(near: float, far: float, n: int, u: list[float] | None) -> list[float]:
    step = (far - near) / (n - 1)
    return [near + (i + (u[i] if u is not None else 0.0)) * step for i in range(n)]


def smooth_weights(w: list[float]) -> list[float]:
    n = len(w)
    out = []
    for i in range(n):
        left = max(w[i - 1], w[i]) if i > 0 else w[i]
        right = max(w[i], w[i + 1]) if i + 1 < n else w[i]
        out.append((left + right) / 2 + 0.01)
    return out


def inverse_cdf(bins: list[float], weights: list[float], us: list[float], eps: float = 1e-5) -> list[float]:
    """Piecewise-linear inverse CDF over bins[0..K] with K = len(weights)."""
    w = [x + eps for x in weights]
    total = sum(w)
    cdf = [0.0]
    for x in w:
        cdf.append(cdf[-1] + x / total)
    k = len(w)
    out = []
    for u in us:
        j = 0  # number of cdf entries <= u
        while j < len(cdf) and cdf[j] <= u:
            j += 1
        lo, hi = max(j - 1, 0), min(j, k)
        denom = cdf[hi] - cdf[lo]
        if denom < eps:
            denom = 1.0
        out.append(bins[lo] + (u - cdf[lo]) / denom * (bins[hi] - bins[lo]))
    return out


# ---------------------------------------------------------------- triplane
def bilinear(plane: torch.Tensor, gx: float, gy: float) -> torch.Tensor:
    """(C,) bilinear lookup, align_corners=False, zero padding; gx along width, gy along height."""
    c, h, w = plane.shape
    x = ((gx + 1) * w - 1) / 2
    y = ((gy + 1) * h - 1) / 2
    x0, y0 = math.floor(x), math.floor(y)
    out = torch.zeros(c, dtype=F64)
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= xx < w and 0 <= yy < h:
                out += wx * wy * plane[:, yy, xx].to(F64)
    return out


def antialias_downsample(plane: torch.Tensor, out_size: int) -> torch.Tensor:
    """(C, r, r): separable triangle filter of width = scale (PIL-style antialiased bilinear)."""
    c, h, w = plane.shape
    scale = h / out_size

    def weights_1d(n_in):
        m = torch.zeros(out_size, n_in, dtype=F64)
        for i in range(out_size):
            centre = (i + 0.5) * scale
            for j in range(n_in):
                m[i, j] = max(0.0, 1 - abs(j + 0.5 - centre) / scale)
            m[i] /= m[i].sum()
        return m

    rows, cols = weights_1d(h), weights_1d(w)
    return torch.einsum("ih,chw,jw->cij", rows, plane.to(F64), cols)


def triplane_features(levels: list[torch.Tensor], point, axes) -> torch.Tensor:
    """(C,) for one point already in [-1, 1] units; levels are (3, C, r, r)."""
    total = 0
    for p, (a, b) in enumerate(axes):
        for level in levels:
            total = total + bilinear(level[p], float(point[a]), float(point[b]))
    return total / len(axes)


# ---------------------------------------------------------------- marching
def march(colors, raw, depths, density_offset=-1.0, sigma_scale=1.0, grad_scale=None):
    """One ray: colors (S, 3), raw (S,), depths (S,) -> (rgb (3,), depth, weight_sum, weights (S-1,), mids).

    Autograd-capable; ``grad_scale`` (S-1,) scales the gradients of alpha and midpoint colours through
    tensor hooks (independent of the library's autograd Function).
    """
    n = depths.shape[0]
    mids = (depths[1:] + depths[:-1]) / 2
    cmid = (colors[1:] + colors[:-1]) / 2
    dens = torch.log1p(torch.exp((raw[1:] + raw[:-1]) / 2 + density_offset)) * sigma_scale
    alpha = 1 - torch.exp(-dens * (depths[1:] - depths[:-1]))
    if grad_scale is not None:
        alpha.register_hook(lambda g: g * grad_scale)
        cmid.register_hook(lambda g: g * grad_scale[:, None])
    weights = []
    trans = torch.ones((), dtype=colors.dtype)
    for i in range(n - 1):
        weights.append(alpha[i] * trans)
        trans = trans * (1 - alpha[i] + 1e-10)
    w = torch.stack(weights)
    wsum = w.sum()
    rgb = (w[:, None] * cmid).sum(0) * 2 - 1
    depth = (w * mids).sum() / (wsum + 1e-3)
    return rgb, depth, wsum, w, mids


def median_depth(weights, mids) -> float:
    acc = 0.0
    for w, t in zip(weights.tolist(), mids.tolist()):
        acc += w
        if acc >= 0.5:
            return t
    return float(mids[-1])
