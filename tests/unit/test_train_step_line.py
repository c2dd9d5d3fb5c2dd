"""The per-window training log line: every loss term, the rates and an ETA at the window's pace."""

from g3dr.train.metrics_log import step_line


def test_step_line_lists_every_term_and_a_readable_eta():
    metrics = {"loss/total": 1.23456, "loss/l1": 0.5, "loss/depth": 0.25, "weight/l1": 1.0, "lr": 1e-4,
               "grad_norm": 0.75, "samples_per_second": 12.5, "data_wait_fraction": 0.125, "peak_memory_mb": 2048.4,
               "seconds_per_step": 4.0}
    line = step_line(50, 1000, metrics)
    assert line == ("step 50/1000 | depth 0.25 | l1 0.5 | total 1.235 | lr 0.0001 | grad_norm 0.75 | "
                    "12.5 samples/s | data_wait 12% | peak_mem 2048 MB | eta 1h03m")  # 950 steps x 4 s
    del metrics["grad_norm"]
    assert "grad_norm" not in step_line(999, 1000, metrics) and step_line(999, 1000, metrics).endswith("eta 0m04s")
