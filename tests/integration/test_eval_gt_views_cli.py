"""``g3dr eval --metrics gt_views`` end to end: a synthetic set with views made by the config's auto-prep,
a tiny checkpoint, a sqlite MLflow store (the metric functions and the eval core: tests/unit/test_eval_gt_views.py)."""

from __future__ import annotations


def test_g3dr_eval_cli_scores_the_stored_views(tmp_path, capsys):
    """``g3dr eval`` on a synthetic set made by the config's auto-prep with views: the metrics reach the
    printed results, results.json and the table."""
    import json

    from g3dr.launchers.main import main
    from g3dr_test_support import load_test_helper

    fx = load_test_helper("eval_fixtures")
    cfg = fx.tiny_config(tmp_path, "data.synthetic_size=8", "data.synthetic_views=2")
    ck = fx.make_checkpoint(cfg, tmp_path / "ck" / "step-1.safetensors", step=1)
    common = ["--checkpoint", str(ck), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-progress",
              "--sigma-scales", "1", "--num-samples", "4", "--out", str(tmp_path / "eval")]
    assert main(["eval", *common, "--metrics", "da,gt_views"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("evaluated\t") and "psnr_novel/s1=" in out and "da_novel/s1=" in out
    (results,) = (tmp_path / "eval").glob("*/results.json")
    metrics = json.loads(results.read_text())["metrics"]
    assert set(metrics) == {"da/s1", "psnr_canonical/s1", "psnr_novel/s1", "da_novel/s1", "psnr_novel_flat/s1",
                            "weight_front_novel/s1", "weight_surface_novel/s1"}
    front, surface = metrics["weight_front_novel/s1"], metrics["weight_surface_novel/s1"]
    assert 0 <= front <= 1 and 0 <= surface <= 1 and front + surface <= 1
    table = (results.parent / "table.md").read_text()
    assert "PSNR novel" in table and "weight in front, novel ↓" in table and "weight at surface, novel ↑" in table
    assert "weight_front_novel" in (results.parent / "table.csv").read_text()
    # the same checkpoint on a set without views: named, a clear error
    assert main(["eval", *common, "--metrics", "gt_views", "data.synthetic_views=0",
                 f"data.synthetic_dir={tmp_path / 'plain'}"]) == 2
    assert "stores no ground-truth views" in capsys.readouterr().err
