"""``g3dr study table-s1`` end to end at toy size: two variants trained in child processes, scored with
the initialisation against exact views, the table written; a rerun trains and evaluates nothing again and
reproduces the table from the study's MLflow runs."""

from __future__ import annotations

import csv
import json

STUDY = ["study", "table-s1", "--variants", "kernel,kl", "--steps", "3", "--views", "1", "--eval-samples", "4",
         "--sigma-scales", "1,50", "--no-progress", "data.synthetic_size=8", "loss.critics=random",
         "loss.canonical.perceptual=0", "loss.novel.perceptual=0", "loss.novel.clip=0",
         "train.checkpoint_every=100000", "train.log_every=1", "renderer.impl=reference"]


def test_table_s1_trains_each_variant_scores_it_and_resumes(tmp_path, capsys):
    from g3dr.launchers.main import main

    out = tmp_path / "study"
    args = [*STUDY[:2], "--out", str(out), *STUDY[2:], f"eval.stats_cache={tmp_path / 'stats'}"]
    assert main(args) == 0
    table = capsys.readouterr().out
    report = json.loads((out / "report" / "study.json").read_text())
    variants = report["variants"]
    assert set(variants) == {"untrained", "kernel", "kl"}
    for name in ("kernel", "kl"):
        assert (out / name / "f_trigen.safetensors").is_file() and variants[name]["train_s"] > 0
        assert f"depth_supervision: {name}" in (out / name / "config.yaml").read_text()
    keys = {f"{m}/s{s}" for m in ("psnr_novel", "da_novel", "nfs", "psnr_canonical") for s in ("1", "50")}
    for name, v in variants.items():
        assert keys <= set(v["metrics"]), name
    # each variant is scored as itself: three different checkpoints, three different sets of numbers
    assert len({json.dumps(v["metrics"], sort_keys=True) for v in variants.values()}) == 3
    rows = list(csv.DictReader((out / "report" / "table-s1.csv").open()))
    assert len(rows) == 2 * 3 and {r["variant"] for r in rows} == {"untrained", "kernel", "kl"}
    assert "| sigma | flat colour: PSNR novel |" in table and "kl: DA novel" in table
    # the no-model baseline: one value per scale, the same for every variant (it reads the data, not weights)
    flat = {(r["sigma_scale"], r["psnr_novel_flat"]) for r in rows}
    assert len(flat) == 2 and len({v for _, v in flat}) == 1

    # a rerun finds everything done: no training (train times kept from the first run), evals skipped,
    # their numbers read back from MLflow: the same table
    stamps = {n: (out / n / "f_trigen.safetensors").stat().st_mtime_ns for n in ("kernel", "kl")}
    assert main(args) == 0
    assert capsys.readouterr().out == table
    again = json.loads((out / "report" / "study.json").read_text())["variants"]
    assert {n: v["metrics"] for n, v in again.items()} == {n: v["metrics"] for n, v in variants.items()}
    assert {n: again[n]["train_s"] for n in stamps} == {n: variants[n]["train_s"] for n in stamps}
    assert stamps == {n: (out / n / "f_trigen.safetensors").stat().st_mtime_ns for n in stamps}


def test_a_study_folder_refuses_another_config_and_names_the_keys(tmp_path):
    from g3dr.config import load_config
    from g3dr.eval.study import _changed_keys

    stored = tmp_path / "config.yaml"
    stored.write_text("# written before train.export_initial existed\n"
                      "train:\n  total_steps: 800\n  lr: 1.0e-3\n")
    same = load_config(stored)
    assert _changed_keys(stored, same) == []  # a key added since, at its default, is no change
    other = load_config(stored, ["train.lr=5e-4", "loss.depth_supervision=kl"])
    assert _changed_keys(stored, other) == ["loss.depth_supervision", "train.lr"]
