"""The typed config tree: presets, round trip, overrides and every kind of validation error."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import yaml

from g3dr.config import (
    Config,
    CameraConfig,
    DataConfig,
    LossConfig,
    RendererConfig,
    TrainConfig,
    config_to_dict,
    dump_config,
    flatten_config,
    load_config,
    parse_override,
    save_config,
)
from g3dr.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_loads_and_round_trips(preset: Path, tmp_path: Path):
    cfg = load_config(preset)
    saved = save_config(cfg, tmp_path / "run")
    assert saved == tmp_path / "run" / "config.yaml"
    again = load_config(saved)
    assert again == cfg
    assert dump_config(again) == dump_config(cfg)


def test_presets_exist():
    assert {p.name for p in PRESETS} >= {"tiny.yaml", "imagenet128.yaml"}


@pytest.mark.parametrize("preset", ["imagenet128.yaml", "imagenet128-reference.yaml"])
def test_imagenet128_spells_out_every_field(preset):
    """The ImageNet presets name every field of every section, so each documents its full recipe."""
    raw = yaml.safe_load((CONFIGS / preset).read_text())

    def keys(node, prefix=""):
        out = set()
        for k, v in node.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out
    assert keys(raw) == set(flatten_config(Config()))


def test_imagenet128_holds_the_design_values():
    cfg = load_config(CONFIGS / "imagenet128.yaml")
    assert cfg.data.resolution == 128 and cfg.data.flip_p == 0.5
    assert (cfg.data.depth_scale, cfg.data.depth_offset) == (2.0, 4.0)
    m = cfg.model
    assert (m.base_width, m.channel_mults, m.num_res_blocks, m.norm_groups) == (128, (1, 2, 4, 8), 2, 8)
    assert (m.pos_emb_channels, m.triplane_channels, m.decoder_hidden) == (256, 64, 64)
    r = cfg.renderer
    assert (r.num_coarse, r.num_fine, r.plane_resolutions, r.box_warp) == (32, 32, (128, 64, 32), 2.0)
    assert (r.depth_prior_p, r.depth_prior_window, r.density_offset, r.plane_convention) == (0.4, 0.05, -1.0, "eg3d")
    k = r.depth_kernel
    assert (k.s1, k.s2, k.c_min, k.c_max) == (1.25, 0.03, 0.05, 1.0)
    c = cfg.camera
    assert (c.fov_degrees, c.radius, c.video_yaw, c.video_pitch) == (18.0, 5.0, 0.35, 0.15)
    assert math.isclose(c.canonical_yaw, math.pi / 2) and math.isclose(c.novel_pitch_range, math.pi / 18)
    assert (c.novel_yaw_den_start, c.novel_yaw_den_end) == (24.0, 6.0)
    loss, canon, novel = cfg.loss, cfg.loss.canonical, cfg.loss.novel
    assert (loss.tau, loss.depth_supervision, loss.clip_resolution) == (0.4, "kernel", 224)
    assert [(v.knots, v.unit) for v in (canon.l1, canon.depth, canon.perceptual, novel.tv, novel.perceptual)] == [
        (((0.0, w),), "steps") for w in (1.0, 2.0, 0.5, 0.1, 0.5)]
    assert canon.perceptual.layers == (1, 1, 1, 1, 1) and novel.perceptual.layers == (0, 0, 0, 1, 1)
    assert (novel.clip.knots, novel.clip.unit) == (((0.0, 0.02), (100_000.0, 0.35)), "steps")
    assert canon.clip.always_zero and canon.weight_sum.always_zero and novel.weight_sum.always_zero
    assert loss.clip_model == "ViT-B-16-quickgelu"
    t = cfg.train
    assert (t.lr, t.lr_start, t.warmup_steps, t.betas, t.lr_schedule) == (1e-4, 2e-6, 20_000, (0.9, 0.99), "warmup_cosine")
    assert (t.micro_batch_size, t.global_batch_size, t.grad_clip, t.beta1_cycle) == (8, 48, 0.0, ())
    assert cfg.eval.sigma_scales == (1.0, 5.0, 10.0, 50.0) and cfg.eval.num_samples == 256
    assert cfg.eval.nfs_bins == 64 and cfg.eval.is_splits == 10
    assert (cfg.eval.nfs_depth, cfg.eval.nfs_cut_quantile, cfg.eval.nfs_near, cfg.eval.nfs_far) == ("3dgp", 0.5, 4.0, 6.0)


def test_reference_preset_differs_from_the_paper_only_in_its_recipe():
    """configs/imagenet128-reference.yaml: the released train.py's recipe, nothing else changed."""
    paper = flatten_config(load_config(CONFIGS / "imagenet128.yaml"))
    reference = flatten_config(load_config(CONFIGS / "imagenet128-reference.yaml"))
    differ = {k for k in paper if paper[k] != reference[k]}
    assert differ == {
        "run_dir", "logging.experiment",
        "loss.canonical.perceptual.knots", "loss.canonical.perceptual.unit", "loss.canonical.clip.knots",
        "loss.canonical.clip.unit", "loss.canonical.weight_sum.knots", "loss.canonical.weight_sum.unit",
        "loss.novel.clip.knots", "loss.novel.perceptual.knots", "loss.novel.weight_sum.knots",
        "loss.novel.weight_sum.unit",
        "train.lr", "train.lr_min", "train.warmup_steps", "train.lr_schedule", "train.beta1_cycle",
    }


def test_defaults_equal_the_paper_preset_except_paths_and_data_source():
    """Dataclass defaults are the paper values: the preset only adds where data and runs live."""
    defaults = flatten_config(Config())
    paper = flatten_config(load_config(CONFIGS / "imagenet128.yaml"))
    differ = {k for k in defaults if defaults[k] != paper[k]}
    assert differ <= {"run_dir", "data.source", "data.shards", "data.num_workers", "logging.experiment"}


# ----------------------------------------------------------------------------- overrides


def test_overrides_apply_with_types(tiny_config_path):
    cfg = load_config(tiny_config_path, [
        "train.lr=1e-3", "train.total_steps=7", "renderer.deterministic=true",
        "model.channel_mults=[1, 2, 4]", "renderer.plane_convention=orthogonal",
        "renderer.depth_kernel.s2=0.05", "logging.run_name=my run", "train.betas=[0.5, 0.9]",
    ])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.train.total_steps == 7
    assert cfg.renderer.deterministic is True
    assert cfg.model.channel_mults == (1, 2, 4)
    assert cfg.renderer.plane_convention == "orthogonal"
    assert cfg.renderer.depth_kernel.s2 == 0.05
    assert cfg.logging.run_name == "my run"
    assert cfg.train.betas == (0.5, 0.9)


def test_later_override_wins_and_file_values_survive(tiny_config_path):
    cfg = load_config(tiny_config_path, ["train.lr=1e-3", "train.lr=2e-3"])
    assert cfg.train.lr == 2e-3
    assert cfg.model.base_width == 16  # from the file, not the default


def test_int_is_accepted_for_float_and_stored_as_float(tiny_config_path):
    cfg = load_config(tiny_config_path, ["renderer.sigma_scale=50"])
    assert cfg.renderer.sigma_scale == 50.0 and type(cfg.renderer.sigma_scale) is float


def test_override_a_whole_section(tiny_config_path):
    cfg = load_config(tiny_config_path, ["renderer.depth_kernel={s2: 0.05, s1: 2.0}"])
    assert cfg.renderer.depth_kernel.s2 == 0.05 and cfg.renderer.depth_kernel.s1 == 2.0


def test_bad_value_inside_a_section_override_blames_the_override(tmp_path):
    # The file sets the same nested key: the error must still name the override that replaced it.
    path = write_yaml(tmp_path / "k.yaml", {"renderer": {"depth_kernel": {"s2": 0.03}}})
    with pytest.raises(ConfigError, match=r"^override 'renderer\.depth_kernel=\{s2: -1\}': renderer\.depth_kernel\.s2"):
        load_config(path, ["renderer.depth_kernel={s2: -1}"])


@pytest.mark.parametrize("text,expected", [
    ("train.lr=1e-4", ("train.lr", 1e-4)),
    ("train.lr=-2.5E+3", ("train.lr", -2500.0)),
    ("a.b=1", ("a.b", 1)),
    ("a.b=true", ("a.b", True)),
    ("a.b=[1, 2]", ("a.b", [1, 2])),
    ("a.b=hello", ("a.b", "hello")),
    ("a.b=", ("a.b", "")),
    ("a.b=x=y", ("a.b", "x=y")),
])
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["train.lr", "=3", "train..lr=1", ".lr=1", "lr.=1"])
def test_malformed_override_is_a_config_error(text):
    with pytest.raises(ConfigError, match=re.escape(f"override '{text}'")):
        parse_override(text)


def test_invalid_yaml_in_override(tiny_config_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tiny_config_path, ["model.channel_mults=[1, 2"])


def test_override_into_a_value_is_an_error(tiny_config_path):
    with pytest.raises(ConfigError, match="override 'train.total_steps.x=1': 'total_steps' is a value, not a section"):
        load_config(tiny_config_path, ["train.total_steps.x=1"])
    # train.lr is not in the file: the error still names the override that made it a section.
    with pytest.raises(ConfigError, match=r"override 'train\.lr\.x=1': train\.lr: expected float, got dict"):
        load_config(tiny_config_path, ["train.lr.x=1"])


# ----------------------------------------------------------------------------- validation errors


def test_unknown_key_in_file_names_key_and_file(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"train": {"lr": 1e-4, "learning_rate": 1e-4}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "unknown key 'train.learning_rate'" in msg and "lr" in msg


def test_unknown_section(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"optimiser": {"lr": 1}})
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'optimiser'"):
        load_config(path)


def test_unknown_key_from_override_names_the_override(tiny_config_path):
    with pytest.raises(ConfigError, match=r"override 'train\.lrr=1': unknown key 'train\.lrr'"):
        load_config(tiny_config_path, ["train.lrr=1"])


@pytest.mark.parametrize("key,value,expect", [
    ("train.lr", "fast", "expected float, got str 'fast'"),
    ("train.total_steps", 1.5, "expected int, got float 1.5"),
    ("train.total_steps", True, "expected int, got bool True"),
    ("renderer.deterministic", "yes", "expected bool, got str 'yes'"),
    ("renderer.deterministic", 1, "expected bool, got int 1"),
    ("logging.experiment", 3, "expected str, got int 3"),
    ("model.channel_mults", 4, "expected list of int, got int 4"),
    ("train.betas", [0.9], "expected 2 values, got 1"),
    ("train.lr", float("nan"), "must be finite"),
])
def test_wrong_type_names_key_and_file(tmp_path, key, value, expect):
    section, name = key.split(".")
    path = write_yaml(tmp_path / "typed.yaml", {section: {name: value}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: {key}")
    assert expect in msg


def test_wrong_type_inside_a_list_names_the_index(tmp_path):
    path = write_yaml(tmp_path / "l.yaml", {"model": {"channel_mults": [1, "two"]}})
    with pytest.raises(ConfigError, match=r"model\.channel_mults\[1\]: expected int, got str 'two'"):
        load_config(path)


@pytest.mark.parametrize("key,value", [
    ("renderer.impl", "fast"),
    ("renderer.plane_convention", "yz"),
    ("train.precision", "fp16"),
    ("train.zero_stage", 3),
    ("eval.metrics", ["fid", "kid"]),
    ("eval.nfs_depth", "mean"),
])
def test_literal_choices(tiny_config_path, key, value):
    with pytest.raises(ConfigError, match=r"must be one of"):
        load_config(tiny_config_path, [f"{key}={value}"])


@pytest.mark.parametrize("override,expect", [
    ("data.flip_p=1.5", "data.flip_p: must be in [0, 1], got 1.5"),
    ("data.resolution=100", "data.resolution: must be one of 32, 64, 128, 256"),
    ("renderer.num_coarse=1", "renderer.num_coarse: must be >= 2"),
    ("renderer.sigma_scale=0", "renderer.sigma_scale: must be > 0"),
    ("renderer.plane_resolutions=[32, 64, 8]", "renderer.plane_resolutions: must be decreasing"),
    ("renderer.depth_kernel.s2=-1", "renderer.depth_kernel.s2: must be > 0"),
    ("renderer.depth_kernel.c_min=2", "renderer.depth_kernel.c_min: must satisfy"),
    ("camera.fov_degrees=180", "camera.fov_degrees: must be in (0, 180)"),
    ("loss.tau=2", "loss.tau: must be in [0, 1]"),
    ("loss.novel.clip=-0.1", "loss.novel.clip.knots: weights must be >= 0"),
    ("loss.kl_sigma=0", "loss.kl_sigma: must be > 0"),
    ("train.beta1_cycle=[0.95, 0.85]", "train.beta1_cycle: cycles beta1 with the one-cycle LR only"),
    ("train.lr_start=1", "train.lr_start: must be in [0, train.lr="),
    ("train.global_batch_size=3", "train.global_batch_size: must be a multiple of train.micro_batch_size (2)"),
    ("train.betas=[0.9, 1.0]", "train.betas: must be two values in [0, 1)"),
    ("model.norm_groups=5", "model.norm_groups: must divide model.base_width (16)"),
    ("eval.sigma_scales=[]", "eval.sigma_scales: must be a non-empty list"),
    ("eval.nfs_cut_quantile=1.0", "eval.nfs_cut_quantile: must be in [0, 1), got 1.0"),
    ("eval.nfs_cut_quantile=-0.5", "eval.nfs_cut_quantile: must be in [0, 1), got -0.5"),
    ("data.source=shards", "data.source: is 'shards' but data.shards is empty"),
    ("distributed.timeout_minutes=0", "distributed.timeout_minutes: must be >= 1"),
])
def test_out_of_range_names_key_and_origin(tiny_config_path, override, expect):
    with pytest.raises(ConfigError) as err:
        load_config(tiny_config_path, [override])
    msg = str(err.value)
    assert msg.startswith(f"override '{override}'")
    assert expect in msg


def test_out_of_range_in_file_names_the_file(tmp_path):
    path = write_yaml(tmp_path / "range.yaml", {"data": {"flip_p": -0.1}})
    with pytest.raises(ConfigError, match=re.escape(f"{path}: data.flip_p: must be in [0, 1], got -0.1")):
        load_config(path)


def test_cross_section_checks(tiny_config_path):
    with pytest.raises(ConfigError, match=r"renderer\.plane_resolutions: the first level must equal data\.resolution \(64\)"):
        load_config(tiny_config_path, ["data.resolution=64"])
    with pytest.raises(ConfigError, match=r"data\.resolution: must be divisible by 2\^\(len\(model\.channel_mults\) - 1\) = 64"):
        load_config(tiny_config_path, ["model.channel_mults=[1,1,1,1,1,1,1]"])
    cfg = load_config(tiny_config_path, ["data.resolution=64", "renderer.plane_resolutions=[64, 32, 16]"])
    assert cfg.data.resolution == 64


def test_section_that_is_not_a_mapping(tmp_path):
    path = write_yaml(tmp_path / "s.yaml", {"train": [1, 2]})
    with pytest.raises(ConfigError, match=r"s\.yaml: train: expected a mapping, got list"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    top = tmp_path / "top.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(top)


def test_empty_file_is_the_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()


# ----------------------------------------------------------------------------- helpers


def test_grad_accumulation_reconciles_world_size():
    train = TrainConfig(micro_batch_size=2, global_batch_size=16)
    assert train.grad_accumulation(1) == 8
    assert train.grad_accumulation(4) == 2
    assert train.grad_accumulation(8) == 1
    with pytest.raises(ConfigError, match=r"not divisible by train\.micro_batch_size=2 x world size 3 = 6"):
        train.grad_accumulation(3)
    with pytest.raises(ConfigError):
        train.grad_accumulation(16)


def test_flatten_and_dict_are_plain():
    cfg = Config()
    flat = flatten_config(cfg)
    assert flat["train.lr"] == 1e-4 and flat["renderer.depth_kernel.s1"] == 1.25
    assert flat["model.channel_mults"] == [1, 2, 4, 8]
    # Plain types only: safe to dump as YAML/JSON and to log as MLflow params.
    yaml.safe_dump(config_to_dict(cfg))


def test_every_field_has_a_default_and_every_section_is_a_dataclass():
    for section in (DataConfig, RendererConfig, CameraConfig, LossConfig, TrainConfig):
        for f in dataclasses.fields(section):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
