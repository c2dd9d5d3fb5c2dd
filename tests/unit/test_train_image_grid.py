"""The training grid: a labelled header over one row per sample, depth in the shared depth colours."""

import numpy as np
import torch

from g3dr.config import load_config
from g3dr.models.f_trigen import FTrigen
from g3dr.train.stage import GRID_COLUMNS, image_grid


def test_grid_has_a_header_one_row_per_sample_and_coloured_depth():
    cfg = load_config("configs/tiny.yaml")
    torch.manual_seed(0)
    model = FTrigen(cfg).eval()
    rgb = torch.rand(2, 3, 32, 32) * 2 - 1
    depth = 4.5 + torch.rand(2, 1, 32, 32)
    grid = image_grid(model, cfg, {"rgb": rgb, "depth": depth}, torch.float32)
    tile = 33
    assert grid.dtype == np.uint8 and grid.shape == (12 + 2 * tile + 1, len(GRID_COLUMNS) * tile + 1, 3)
    header = grid[:12]
    assert (header == 255).mean() > 0.7 and (header < 128).any()  # white strip with dark label text
    # the input tile of sample 0 is the input itself
    np.testing.assert_allclose(grid[13:45, 1:33] / 127.5 - 1, rgb[0].permute(1, 2, 0).numpy(), atol=1 / 127.5 + 1e-6)
    prior = grid[13:45, 5 * tile + 1:6 * tile].astype(int)  # pseudo-depth column: coloured, not grey
    assert np.abs(prior[..., 0] - prior[..., 2]).mean() > 20
