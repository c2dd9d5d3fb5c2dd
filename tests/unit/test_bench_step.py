"""``g3dr bench step``: the JSON line of a tiny run, and that the benchmarked step really trains."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from g3dr.train.bench import bench_step, build_case, view_step


@pytest.mark.parametrize("view", ["canonical", "novel"])
def test_train_step_updates_parameters_and_picks_the_view(tiny_config_path, view):
    case = build_case(str(tiny_config_path), "reference", "config", 1, "cpu", seed=0)
    model, cfg = case["model"], case["cfg"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    report = bench_step(case, view_step(cfg, view))
    assert report["canonical"] == (view == "canonical")
    assert torch.isfinite(torch.tensor(report["loss/total"]))
    # The full objective of the view is in the step.
    expected = {"l1", "depth", "perceptual"} if view == "canonical" else {"clip", "tv", "perceptual"}
    assert {f"loss/{view}/{k}" for k in expected} <= set(report)
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    # Adam moves every parameter that received a gradient: the generator's and the decoder's alike.
    assert any(n.startswith("generator.") for n in changed) and any(n.startswith("decoder.") for n in changed)
    assert len(changed) >= 0.9 * len(before)
    # Critics stay frozen and outside the optimizer.
    params = {id(p) for g in case["optimizer"].param_groups for p in g["params"]}
    critic_params = list(case["task"].critics.clip.parameters()) + list(case["task"].critics.vgg.parameters())
    assert critic_params and all(not p.requires_grad and id(p) not in params for p in critic_params)


def test_bench_step_prints_one_json_line(tiny_config_path):
    proc = subprocess.run([sys.executable, "-m", "g3dr.launchers.main", "bench", "step", "--configs", "tiny",
                           "--tiny-config", str(tiny_config_path), "--steps", "1", "--warmup", "0"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["bench"] == "step" and out["device"] == "cpu" and out["batch"] == 1 and out["steps"] == 1
    assert "ru_maxrss" in out["memory_measure"]
    assert set(out["cases"]) == {"tiny"}
    tiny = out["cases"]["tiny"]
    assert set(tiny) == {"reference", "fused", "fused_over_reference"}
    for impl in ("reference", "fused"):
        r = tiny[impl]
        for key in ("s_per_step", "cpu_s_per_step", "samples_per_s"):
            assert set(r[key]) == {"canonical", "novel", "mean"} and all(v > 0 for v in r[key].values())
        assert r["samples_per_s"]["canonical"] == pytest.approx(1 / r["s_per_step"]["canonical"], rel=0.02)
        assert r["peak_rss_mib"] > r["peak_mib"] > 0
        assert r["params_digest_changed"] and r["param_tensors_updated"] >= 0.9 * r["param_tensors"]
    ratios = tiny["fused_over_reference"]
    assert ratios["s_per_step_mean"] == pytest.approx(
        tiny["fused"]["s_per_step"]["mean"] / tiny["reference"]["s_per_step"]["mean"], rel=0.02)
    assert ratios["peak_mib"] == pytest.approx(tiny["fused"]["peak_mib"] / tiny["reference"]["peak_mib"], rel=0.02)
    # Same seed, same inputs, same task: the two renderer paths give the same losses.
    for view in ("canonical", "novel"):
        assert tiny["fused"]["loss"][view] == pytest.approx(tiny["reference"]["loss"][view], rel=1e-3)


def test_bench_step_rejects_unknown_config(capsys):
    from g3dr.launchers.main import main

    assert main(["bench", "step", "--configs", "huge"]) != 0
    assert "--configs" in capsys.readouterr().err
