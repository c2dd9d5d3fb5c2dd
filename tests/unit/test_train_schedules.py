"""Schedules in optimizer steps, against hand-computed values."""

from __future__ import annotations

import math
import random

import pytest

from g3dr.config import load_config
from g3dr.train.schedules import clip_weight, is_canonical, learning_rate, novel_view_threshold, weight_sum_weight


@pytest.fixture(scope="module")
def paper():
    return load_config("configs/imagenet128.yaml")


def test_learning_rate_warmup_and_cosine(paper):
    t = paper.train  # 2e-6 -> 1e-4 over 20k, cosine to 0 at 300k
    assert learning_rate(0, t) == pytest.approx(2e-6)
    assert learning_rate(10_000, t) == pytest.approx(2e-6 + 0.5 * 98e-6)  # 5.1e-5
    assert learning_rate(20_000, t) == pytest.approx(1e-4)
    assert learning_rate(160_000, t) == pytest.approx(0.5e-4)  # half-way through the cosine
    assert learning_rate(90_000, t) == pytest.approx(0.5e-4 * (1 + math.cos(math.pi / 4)))
    assert learning_rate(300_000, t) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate(400_000, t) == pytest.approx(0.0, abs=1e-12)
    t2 = load_config("configs/imagenet128.yaml", ["train.lr_min=1e-5"]).train
    assert learning_rate(160_000, t2) == pytest.approx(1e-5 + 0.5 * 9e-5)


def test_clip_ramp(paper):
    loss = paper.loss
    assert clip_weight(0, loss) == pytest.approx(0.02)
    assert clip_weight(50_000, loss) == pytest.approx(0.185)
    assert clip_weight(100_000, loss) == pytest.approx(0.35)
    assert clip_weight(250_000, loss) == pytest.approx(0.35)


def test_weight_sum_ramp(paper):
    loss = load_config("configs/imagenet128.yaml", ["loss.weight_sum=1.0"]).loss
    assert weight_sum_weight(0, loss, 300_000) == 0.0
    assert weight_sum_weight(75_000, loss, 300_000) == pytest.approx(0.5)
    assert weight_sum_weight(200_000, loss, 300_000) == pytest.approx(1.0)
    assert weight_sum_weight(200_000, paper.loss, 300_000) == 0.0  # off by default


def test_view_choice_eq1_thresholds_and_frequencies():
    assert novel_view_threshold(0, 1000, 0.4) == 0.0
    assert novel_view_threshold(100, 1000, 0.4) == pytest.approx(0.2)
    assert novel_view_threshold(900, 1000, 0.4) == pytest.approx(0.4)
    assert is_canonical(0.25, 100, 1000, 0.4) and not is_canonical(0.15, 100, 1000, 0.4)
    rng = random.Random(0)
    n = 20_000
    for step, expected_novel in [(0, 0.0), (50, 0.1), (500, 0.4)]:
        novel = sum(not is_canonical(rng.random(), step, 1000, 0.4) for _ in range(n)) / n
        assert novel == pytest.approx(expected_novel, abs=0.015)
