"""``g3dr generate`` with a tiny random-weight LDM3D pipeline built here (diffusers' StableDiffusionLDM3DPipeline
with a 4-channel RGB + depth autoencoder), saved to a folder and loaded from it like real local weights."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from g3dr.launchers.main import main
from g3dr.data.depth_codec import decode_u16_png

diffusers = pytest.importorskip("diffusers", reason="g3dr generate needs the optional 'generate' extra (diffusers)")
transformers = pytest.importorskip("transformers", reason="g3dr generate needs the optional 'generate' extra")


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm3d")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "photo</w>": 3, "of</w>": 4, "cat</w>": 5}
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    vae = diffusers.AutoencoderKL(in_channels=4, out_channels=4, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2,
                                  norm_num_groups=4, sample_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionLDM3DPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=diffusers.DDIMScheduler(),
            safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_config_path, helper_module):
    return helper_module("tiny_models").save_perturbed_f_trigen(
        tiny_config_path, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", step=1)


def test_generate_writes_rgbd_in_the_release_layout_and_lifts_it(tiny_pipeline, checkpoint, tmp_path):
    pytest.importorskip("trimesh", reason="the mesh output needs the 'mesh' extra")
    from g3dr.assets.generate_cli import load_ldm3d
    from g3dr.data.depth_model import codes_from_prediction

    out = tmp_path / "gen"
    assert main(["generate", "--pipeline", str(tiny_pipeline), "--class", "cat", "--num", "2", "--steps", "2",
                 "--size", "16", "--seed", "5", "--device", "cpu", "--out", str(out), "--checkpoint", str(checkpoint),
                 "--png", "--mesh", "ply", "--grid", "12", "--threshold", "0.3", "--deterministic"]) == 0
    record = json.loads((out / "generate.json").read_text())
    assert record["prompt"] == "a photo of a cat"
    assert record["images"] == ["a_photo_of_a_cat_000", "a_photo_of_a_cat_001"]
    pipe = load_ldm3d(str(tiny_pipeline), "cpu")
    for i, name in enumerate(record["images"]):
        rgb = np.asarray(Image.open(out / "rgbd" / f"{name}.png"))
        codes = decode_u16_png((out / "rgbd" / f"{name}_depth.png").read_bytes())
        assert rgb.shape == (16, 16, 3) and codes.shape == (16, 16) and codes.dtype == np.uint16
        # The same call made directly: seed + i, the pipeline's depth mapped like the data-prep depth backend.
        direct = pipe(prompt="a photo of a cat", height=16, width=16, num_inference_steps=2, guidance_scale=5.0,
                      output_type="np", generator=torch.Generator().manual_seed(5 + i))
        np.testing.assert_array_equal(rgb, np.clip(np.rint(direct.rgb[0] * 255), 0, 255).astype(np.uint8))
        expected, _ = codes_from_prediction(np.asarray(direct.depth[0], np.float64)[..., 0], inverse=True)
        np.testing.assert_array_equal(codes, expected)
        assert codes.min() == 0 and codes.max() == 65535  # per-image percentile mapping spans the encoding
        assert (out / f"{name}.png").is_file() and (out / f"{name}.ply").is_file()
    # The release layout can be lifted again by g3dr batch.
    assert main(["batch", "--checkpoint", str(checkpoint), "--input", str(out / "rgbd"), "--out", str(tmp_path / "b"),
                 "--device", "cpu", "--no-progress", "--png"]) == 0
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["written"] == 2


def test_generate_errors(tiny_pipeline, tmp_path, capsys):
    assert main(["generate", "--pipeline", str(tmp_path / "missing"), "--prompt", "x", "--out", str(tmp_path / "o"),
                 "--device", "cpu"]) != 0
    assert "huggingface-cli download" in capsys.readouterr().err
    assert main(["generate", "--pipeline", str(tiny_pipeline), "--prompt", "x", "--out", str(tmp_path / "o"),
                 "--png", "--device", "cpu"]) != 0
    assert "need --checkpoint" in capsys.readouterr().err
