"""Tiny random-weight models saved the way real ones are, for the CLI tests (render, assets, prep)."""

from __future__ import annotations

from pathlib import Path

import torch


def perturbed_f_trigen(cfg):
    """The config's f_trigen from seed 0 with every parameter nudged by 0.05 N(0, 1) (so no layer is exactly at its
    init, e.g. zero-initialised outputs)."""
    from g3dr.models import FTrigen

    torch.manual_seed(0)
    model = FTrigen(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def save_perturbed_f_trigen(config_path: Path, path: Path, step: int) -> Path:
    """:func:`perturbed_f_trigen` of the config at ``config_path``, saved as a real checkpoint file at ``path``."""
    from g3dr.config import load_config
    from g3dr.models import save_f_trigen

    cfg = load_config(config_path)
    return save_f_trigen(perturbed_f_trigen(cfg), cfg, path, step=step)


def save_tiny_depth_anything(folder: Path) -> Path:
    """A random-weight Depth Anything (28 px, 4 layers of width 16) and its processor, saved to ``folder`` as
    ``from_pretrained`` reads it. Needs transformers (the 'depth' extra): callers skip without it."""
    import transformers

    backbone = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2, image_size=28,
                                         patch_size=14, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    config = transformers.DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=16,
                                              neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=8,
                                              head_hidden_size=4, patch_size=14)
    torch.manual_seed(0)
    model = transformers.DepthAnythingForDepthEstimation(config)
    with torch.no_grad():
        # The default init (std 0.02) gives a near-constant map behind the final ReLU: use fan-in
        # scaled weights and a positive output bias so the random model predicts a varied map.
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, param[0].numel() ** -0.5)
        model.head.conv3.bias.fill_(1.0)
    processor = transformers.DPTImageProcessor(size={"height": 28, "width": 28}, keep_aspect_ratio=False,
                                               ensure_multiple_of=14, image_mean=[0.485, 0.456, 0.406],
                                               image_std=[0.229, 0.224, 0.225])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_sr(path: Path, seed: int = 0) -> Path:
    """A tiny random-weight super-resolution RCAN (x2: 1 group of 1 block, 8 features) saved with ``save_sr``;
    the weights are nudged by 0.05 N(0, 1) so the network is not near the identity of its init."""
    from g3dr.config import SRConfig
    from g3dr.models.sr import build_sr, save_sr

    torch.manual_seed(seed)
    model = build_sr(SRConfig(n_resgroups=1, n_resblocks=1, n_feats=8, reduction=4))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return save_sr(model, path, metadata={"source": "test"})
