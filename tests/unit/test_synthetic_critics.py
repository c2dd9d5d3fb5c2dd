"""``loss.critics: synthetic``: tiny critics trained on procedural primitives carry information; cache, lock,
reproducibility, frozen-but-differentiable, config checks.

One critic pair is trained per session (a small budget, ~6 s) and shared; the cache, lock and reproducibility
tests train even smaller ones.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from g3dr.config import load_config
from g3dr.data.synth import random_primitive
from g3dr.errors import ConfigError
from g3dr.losses import build_critics
from g3dr.losses import synthetic_critics as sc

TINY = "configs/tiny.yaml"
# The shared critics' budget: enough to be clearly informative, small enough for a unit test.
BUDGET = ["loss.synthetic_critics.primitives=256", "loss.synthetic_critics.views=2",
          "loss.synthetic_critics.steps=150", "loss.synthetic_critics.batch_size=32"]
SMALL = dict(clip_model="ViT-B-16-quickgelu", clip_resolution=32, image_resolution=32, seed=3, primitives=16,
             views=2, steps=4, batch_size=8)
"""A recipe that trains in well under a second (cache, lock and reproducibility tests)."""


def _synthetic_cfg(cache: Path, extra=()):
    return load_config(TINY, ["loss.critics=synthetic", f"loss.synthetic_critics.dir={cache}", *BUDGET, *extra])


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    cache = tmp_path_factory.mktemp("critics-cache")
    cfg = _synthetic_cfg(cache)
    critics = build_critics(cfg.loss, image_resolution=cfg.data.resolution)
    files = list(cache.glob("*.pt"))
    assert len(files) == 1
    return {"cfg": cfg, "critics": critics, "cache": cache, "file": files[0]}


@pytest.fixture(scope="module")
def held_out(synthetic):
    """200 primitives the critics never saw (indices from `primitives` on), two views each."""
    s = synthetic["cfg"].loss.synthetic_critics
    return sc.render_critic_views(s.seed, range(s.primitives, s.primitives + 200), 2, 32)


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------------ information


def test_synthetic_critics_carry_information_random_ones_do_not(synthetic, held_out):
    torch.manual_seed(0)
    random = build_critics(load_config(TINY).loss)
    syn = synthetic["critics"]
    n = held_out.shape[0]
    acc_syn, acc_rnd = sc.view_retrieval_accuracy(syn.clip, held_out), sc.view_retrieval_accuracy(random.clip, held_out)
    acc_l1 = sc.view_retrieval_accuracy(syn.clip, held_out, "l1")  # the distance the G3DR CLIP loss uses
    # Chance is 1 / 200; measured: synthetic 0.33 (l1 0.34), random critics 0.02 to 0.04 over four init seeds.
    assert acc_syn > 30 / n and acc_l1 > 30 / n, (acc_syn, acc_l1)
    assert acc_syn > acc_rnd + 0.15, (acc_syn, acc_rnd)
    # Fraction of wrong orderings (a different primitive at most as far as the other view of the same one). Measured:
    # all five blocks (the canonical set) 0.116, random critics 0.20 to 0.26 over four init seeds (the shallow blocks
    # compare colours, which random filters do too); the two deepest (the novel-view set) 0.036 against 0.11 to 0.17.
    for layers, ratio in ((None, 0.7), ((0.0, 0.0, 0.0, 1.0, 1.0), 0.5)):
        err_syn = 1 - sc.perceptual_ordering(syn.vgg, held_out, layers)
        err_rnd = 1 - sc.perceptual_ordering(random.vgg, held_out, layers)
        assert err_syn < ratio * err_rnd, (layers, err_syn, err_rnd)


def test_information_measures_on_hand_made_cases():
    torch.manual_seed(0)
    first = torch.rand(6, 3, 8, 8) * 2 - 1
    perm = torch.tensor([0, 1, 2, 4, 3, 5])  # four fixed points
    views = torch.stack([first, first[perm]], dim=1)

    class Flatten(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)

    assert sc.view_retrieval_accuracy(Flatten(), views) == pytest.approx(4 / 6)
    assert sc.view_retrieval_accuracy(Flatten(), views, "l1") == pytest.approx(4 / 6)

    class Pixels(torch.nn.Module):  # a one-layer "perceptual critic": mean squared pixel difference
        num_layers = 1

        def layer_distances(self, x, y):
            return (x - y).pow(2).mean(dim=(1, 2, 3))[:, None]

    same = torch.stack([first, first], dim=1)
    assert sc.perceptual_ordering(Pixels(), same, negatives=2) == 1.0
    wins = sc.perceptual_ordering(Pixels(), views, negatives=1)
    d = lambda i, j: float((first[i] - first[j]).pow(2).mean())  # noqa: E731
    # negatives=1: primitive i's positive is first[perm[i]], its negative first[perm[i + 1]] (ties are not wins).
    expected = sum(d(i, perm[i]) < d(i, perm[(i + 1) % 6]) for i in range(6)) / 6
    assert wins == pytest.approx(expected)


def test_critic_primitives_are_not_dataset_primitives():
    """The critics' seed stream never yields a dataset sample's primitive (synth_sample: default_rng((seed, index)))."""
    for seed in (0, 1, 420):
        for index in range(4):
            ours = random_primitive(sc.critic_primitive_rng(seed, index))
            data = random_primitive(np.random.default_rng([seed, index]))
            assert not np.allclose(ours.rotation, data.rotation)


# ------------------------------------------------------------------------------------------------ cache


def test_second_build_loads_the_cache_without_training(synthetic, monkeypatch):
    mtime = synthetic["file"].stat().st_mtime_ns

    def no_training(spec):
        raise AssertionError("trained although the cache holds these critics")

    monkeypatch.setattr(sc, "train_synthetic_critics", no_training)
    cfg = synthetic["cfg"]
    again = build_critics(cfg.loss, image_resolution=cfg.data.resolution)
    assert synthetic["file"].stat().st_mtime_ns == mtime
    _assert_same_state(_state(again.clip), _state(synthetic["critics"].clip))
    _assert_same_state(_state(again.vgg), _state(synthetic["critics"].vgg))
    _, _, trained = sc.load_or_train_synthetic_critics(sc.SyntheticCriticSpec.from_config(cfg.loss, 32),
                                                        synthetic["cache"])
    assert trained is False


def test_a_changed_recipe_trains_into_another_file(tmp_path):
    spec = sc.SyntheticCriticSpec(**SMALL)
    _, _, trained = sc.load_or_train_synthetic_critics(spec, tmp_path)
    assert trained
    changed = dataclasses.replace(spec, steps=spec.steps + 1)
    clip_b, _, trained_b = sc.load_or_train_synthetic_critics(changed, tmp_path)
    assert trained_b and spec.file_name() != changed.file_name()
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == sorted([spec.file_name(), changed.file_name()])
    clip_a, _, trained_a = sc.load_or_train_synthetic_critics(spec, tmp_path)
    assert not trained_a
    assert any(not torch.equal(a, b) for a, b in zip(clip_a.state_dict().values(), clip_b.state_dict().values()))


def test_every_recipe_field_and_the_code_version_change_the_key(monkeypatch):
    spec = sc.SyntheticCriticSpec(**SMALL)
    keys = {spec.key()}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        keys.add(dataclasses.replace(spec, **{f.name: value + 4 if isinstance(value, int) else value + "-x"}).key())
    monkeypatch.setattr(sc, "CODE_VERSION", sc.CODE_VERSION + 1)
    keys.add(spec.key())
    assert len(keys) == len(dataclasses.fields(spec)) + 2


def test_a_file_of_another_recipe_is_refused(tmp_path):
    spec = sc.SyntheticCriticSpec(**SMALL)
    sc.load_or_train_synthetic_critics(spec, tmp_path)
    other = dataclasses.replace(spec, seed=spec.seed + 1)
    (tmp_path / spec.file_name()).rename(tmp_path / other.file_name())
    from g3dr.errors import WeightsError

    with pytest.raises(WeightsError, match="another recipe.*delete it"):
        sc.load_or_train_synthetic_critics(other, tmp_path)
    (tmp_path / other.file_name()).write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="(?s)cannot read.*delete it"):
        sc.load_or_train_synthetic_critics(other, tmp_path)


def test_training_is_seeded_reproducible_and_leaves_the_global_rng_alone(tmp_path):
    spec = sc.SyntheticCriticSpec(**SMALL)
    before = torch.get_rng_state()
    a = sc.train_synthetic_critics(spec)
    assert torch.equal(torch.get_rng_state(), before)
    b = sc.train_synthetic_critics(spec)
    for tower in ("clip", "vgg"):
        _assert_same_state(a[tower], b[tower])
    c = sc.train_synthetic_critics(dataclasses.replace(spec, seed=spec.seed + 1))
    assert any(not torch.equal(a["vgg"][k], c["vgg"][k]) for k in a["vgg"])
    # Untrained != trained: the steps changed the weights.
    untrained_clip, _ = sc.build_synthetic_architectures(spec)
    assert any(not torch.equal(v, a["clip"][k])
               for k, v in untrained_clip.state_dict().items() if k.startswith("visual."))
    sc.load_or_train_synthetic_critics(spec, tmp_path)  # trains and writes
    before = torch.get_rng_state()
    clip, vgg, trained = sc.load_or_train_synthetic_critics(spec, tmp_path)
    assert not trained and torch.equal(torch.get_rng_state(), before)
    _assert_same_state(clip.state_dict(), a["clip"])
    _assert_same_state(vgg.state_dict(), a["vgg"])


# ------------------------------------------------------------------------------------------------ lock


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from g3dr.losses import synthetic_critics as sc
    cache, go, ready = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    spec = sc.SyntheticCriticSpec(clip_model="ViT-B-16-quickgelu", clip_resolution=32, image_resolution=32, seed=5,
                                  primitives=48, views=2, steps=25, batch_size=16)
    ready.touch()
    while not go.exists():
        time.sleep(0.005)
    clip, vgg, trained = sc.load_or_train_synthetic_critics(spec, cache)
    total = sum(float(v.double().sum()) for v in [*clip.state_dict().values(), *vgg.state_dict().values()])
    print(f"RESULT trained={trained} checksum={total!r}", flush=True)
""")


def test_two_processes_building_at_once_train_once(tmp_path):
    cache, go = tmp_path / "cache", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "OMP_NUM_THREADS": "1"}
    procs, ready = [], []
    for k in range(2):
        ready.append(tmp_path / f"ready{k}")
        procs.append(subprocess.Popen([sys.executable, "-c", CHILD, str(cache), str(go), str(ready[-1])], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready):  # both imported and waiting: release them together
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(next(line for line in out.splitlines() if line.startswith("RESULT")))
    trained = sorted(r.split()[1] for r in results)
    assert trained == ["trained=False", "trained=True"], results
    assert len({r.split()[2] for r in results}) == 1, results  # the loader got the trainer's weights
    assert len(list(cache.glob("*.pt"))) == 1 and not list(cache.glob(".*tmp*"))


# ------------------------------------------------------------------------------------------------ use


def test_critics_are_frozen_but_pass_gradients(synthetic):
    critics = synthetic["critics"]
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    loss = critics.vgg(x, y) + (critics.clip(x) - critics.clip(y)).abs().mean()
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for module in (critics.clip, critics.vgg):
        assert not module.training
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    assert all(torch.equal(critics.vgg.channel_weight(k), torch.ones_like(critics.vgg.channel_weight(k)))
               for k in range(critics.vgg.num_layers))


@pytest.mark.parametrize("override, key", [
    ("loss.synthetic_critics.views=1", "views"),
    ("loss.synthetic_critics.primitives=1", "primitives"),
    ("loss.synthetic_critics.batch_size=600", "batch_size"),
    ("loss.synthetic_critics.steps=0", "steps"),
    ("loss.synthetic_critics.seed=-1", "seed"),
    ("loss.synthetic_critics.dir=", "dir"),
    ("loss.clip_resolution=30", "clip_resolution"),
])
def test_config_checks_the_synthetic_keys(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(TINY, ["loss.critics=synthetic", override])


def test_clip_resolution_divisibility_only_matters_for_synthetic():
    load_config(TINY, ["loss.clip_resolution=30"])  # random critics: unchanged behaviour
