"""Schedules in optimizer steps, against hand-computed values."""

from __future__ import annotations

import math
import random

import pytest

import torch

from g3dr.config import WeightSchedule, load_config
from g3dr.errors import ConfigError
from g3dr.train.schedules import StepSchedule, adam_beta1, is_canonical, learning_rate, novel_view_threshold


@pytest.fixture(scope="module")
def paper():
    return load_config("configs/imagenet128.yaml")


@pytest.fixture(scope="module")
def reference():
    return load_config("configs/imagenet128-reference.yaml")


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
    assert adam_beta1(123, t) == 0.9  # no cycling in the paper preset


def _torch_one_cycle(train, steps):
    """LR and beta1 of torch's own OneCycleLR (the reference code's scheduler) at steps 0 .. steps - 1."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=train.lr, betas=tuple(train.betas))
    high, base = train.beta1_cycle or (0.95, 0.85)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=train.lr, total_steps=train.total_steps, pct_start=train.warmup_steps / train.total_steps,
        div_factor=train.lr / train.lr_start, final_div_factor=train.lr_start / train.lr_min,
        cycle_momentum=bool(train.beta1_cycle), max_momentum=high, base_momentum=base)
    lrs, betas = [], []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        betas.append(opt.param_groups[0]["betas"][0])
        opt.step()
        sched.step()
    return lrs, betas


@pytest.mark.parametrize("total, warmup", [(300, 6), (50, 10), (7, 2)])
def test_one_cycle_equals_torch_onecycle(reference, total, warmup):
    train = load_config("configs/imagenet128-reference.yaml",
                        [f"train.total_steps={total}", f"train.warmup_steps={warmup}"]).train
    lrs, betas = _torch_one_cycle(train, total)
    for step in range(total):
        assert learning_rate(step, train) == pytest.approx(lrs[step], rel=1e-9, abs=1e-16), step
        assert adam_beta1(step, train) == pytest.approx(betas[step], rel=1e-9), step


def test_reference_one_cycle_values(reference):
    t = reference.train  # 5e-5 peak at step 5999, 2e-6 at 0, 2e-10 at the end; beta1 0.95 -> 0.85 -> 0.95
    assert learning_rate(0, t) == pytest.approx(2e-6)
    assert learning_rate(5999, t) == pytest.approx(5e-5)
    assert learning_rate(t.total_steps - 1, t) == pytest.approx(2e-10)
    assert adam_beta1(0, t) == pytest.approx(0.95)
    assert adam_beta1(5999, t) == pytest.approx(0.85)
    assert adam_beta1(t.total_steps - 1, t) == pytest.approx(0.95)


def test_step_schedule_drives_adam_like_torch_onecycle(reference):
    """Through a real optimizer: parameters after N steps equal torch Adam + OneCycleLR(cycle_momentum)."""
    train = load_config("configs/imagenet128-reference.yaml", ["train.total_steps=12", "train.warmup_steps=4",
                                                              "train.lr=0.05", "train.lr_start=0.002",
                                                              "train.lr_min=0.0001"]).train
    torch.manual_seed(0)
    grads = [torch.randn(5) for _ in range(12)]

    def run(make_scheduler):
        p = torch.nn.Parameter(torch.ones(5))
        opt = torch.optim.Adam([p], lr=train.lr, betas=tuple(train.betas))
        sched = make_scheduler(opt)
        for g in grads:
            p.grad = g.clone()
            opt.step()
            sched.step()
        return p.detach(), sched

    ours, sched = run(lambda opt: StepSchedule(opt, train))
    theirs, _ = run(lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.05, total_steps=12, pct_start=4 / 12, div_factor=25, final_div_factor=20,
        cycle_momentum=True, max_momentum=0.95, base_momentum=0.85))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    state = sched.state_dict()
    assert state["last_epoch"] == 12 and "train_cfg" not in state  # plain data in checkpoints


def test_beta1_cycle_needs_one_cycle():
    with pytest.raises(ConfigError, match="beta1_cycle"):
        load_config("configs/imagenet128.yaml", ["train.beta1_cycle=[0.95, 0.85]"])


def test_weight_schedules_paper_clip_ramp(paper):
    clip = paper.loss.novel.clip  # 0.02 -> 0.35 over 100k optimizer steps, then constant
    total = paper.train.total_steps
    assert clip.at(0, total) == pytest.approx(0.02)
    assert clip.at(50_000, total) == pytest.approx(0.185)
    assert clip.at(100_000, total) == pytest.approx(0.35)
    assert clip.at(250_000, total) == pytest.approx(0.35)
    assert paper.loss.canonical.clip.always_zero and paper.loss.canonical.weight_sum.always_zero


def test_weight_schedules_reference_steps_and_ramps(reference):
    loss, total = reference.loss, reference.train.total_steps  # T = 300k
    # train.py:410: canonical LPIPS and CLIP from step > T // 2 (1-based steps): our step >= T / 2.
    assert loss.canonical.perceptual.at(149_999, total) == 0.0
    assert loss.canonical.perceptual.at(150_000, total) == 1.0
    assert loss.canonical.clip.at(149_999, total) == 0.0
    assert loss.canonical.clip.at(150_000, total) == pytest.approx(0.175)
    assert loss.novel.clip.at(0, total) == loss.novel.clip.at(total, total) == pytest.approx(0.35)
    assert loss.novel.perceptual.at(7, total) == 2.0 and loss.novel.perceptual.layers == (0, 0, 0, 1, 1)
    for view in (loss.canonical, loss.novel):  # (1 - sum w) ramped 0 -> 1 over T / 2
        assert view.weight_sum.at(0, total) == 0.0
        assert view.weight_sum.at(75_000, total) == pytest.approx(0.5)
        assert view.weight_sum.at(200_000, total) == 1.0


def test_weight_schedule_knots_and_errors():
    s = WeightSchedule(knots=((10, 1.0), (20, 3.0), (20, 5.0), (30, 0.0)))
    assert [s.at(x, 100) for x in (0, 10, 15, 19, 20, 25, 30, 99)] == [1.0, 1.0, 2.0, 2.8, 5.0, 2.5, 0.0, 0.0]
    assert WeightSchedule.from_scalar(0.1).at(12345, 10) == 0.1
    cfg = load_config("configs/tiny.yaml", ["loss.novel.tv=0.3", "loss.canonical.l1={knots: [[0, 1], [1, 2]], unit: fraction}"])
    assert cfg.loss.novel.tv.at(5, 20) == 0.3 and cfg.loss.canonical.l1.at(5, 20) == pytest.approx(1.25)
    with pytest.raises(ConfigError, match=r"loss\.novel\.tv\.knots.*must not decrease"):
        load_config("configs/tiny.yaml", ["loss.novel.tv.knots=[[5, 1], [2, 1]]"])
    with pytest.raises(ConfigError, match=r"loss\.canonical\.l1\.knots.*<= 1"):
        load_config("configs/tiny.yaml", ["loss.canonical.l1={knots: [[0, 1], [2, 1]], unit: fraction}"])
    with pytest.raises(ConfigError, match=r"loss\.clip_ramp_steps.*loss\.novel\.clip"):
        load_config("configs/tiny.yaml", ["loss.clip_ramp_steps=10"])  # an old key names where it went


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


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_step_schedule_cycles_beta1_through_deepspeed(zero_stage):
    """The reference recipe's LR and momentum cycle reach Adam inside a DeepSpeed engine (ZeRO wraps the
    optimizer): after 8 steps the weights equal plain torch Adam + OneCycleLR(cycle_momentum=True)."""
    import deepspeed

    from g3dr.distributed import DistEnv
    from g3dr.train.ds_config import deepspeed_config
    from g3dr.distributed import init_process_group

    cfg = load_config("configs/imagenet128-reference.yaml", [
        "device=cpu", "train.precision=fp32", f"train.zero_stage={zero_stage}", "train.micro_batch_size=2",
        "train.global_batch_size=2", "train.total_steps=8", "train.warmup_steps=3", "train.lr=0.05",
        "train.lr_start=0.002", "train.lr_min=0.0001"])
    init_process_group(DistEnv(), "cpu", cfg.distributed.backend, cfg.distributed.timeout_minutes, via="deepspeed")
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    copy = torch.nn.Linear(5, 3)
    copy.load_state_dict(model.state_dict())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=deepspeed_config(cfg, 1, "cpu"), dist_init_required=False,
                                           lr_scheduler=lambda opt: StepSchedule(opt, cfg.train))
    opt = torch.optim.Adam(copy.parameters(), lr=0.05, betas=(0.9, 0.99), eps=cfg.train.eps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=8, pct_start=3 / 8, div_factor=25,
                                                final_div_factor=20, cycle_momentum=True)
    g = torch.Generator().manual_seed(1)
    betas = []
    for _ in range(8):
        x = torch.randn(2, 5, generator=g)
        betas.append(engine.optimizer.param_groups[0]["betas"][0])
        engine.backward(engine(x).pow(2).mean())
        engine.step()
        opt.zero_grad()
        copy(x).pow(2).mean().backward()
        opt.step()
        sched.step()
    assert betas == pytest.approx([adam_beta1(s, cfg.train) for s in range(8)], rel=1e-12)
    assert betas[0] == pytest.approx(0.95) and min(betas) == pytest.approx(0.85)
    for ours, theirs in zip(engine.module.parameters(), copy.parameters()):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-6)
