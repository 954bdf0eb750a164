"""benchmarks/time_to_quality.py on a run folder's metrics.csv (docs/results.md, "Time to quality")."""

from __future__ import annotations

import json

from benchmarks.time_to_quality import main


def test_first_time_each_threshold_is_reached_from_metrics_csv(tmp_path, capsys):
    run = tmp_path / "after"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "step,elapsed_seconds,loss,val_mse_frame,val_ssim\n"
        "50,30,600,,\n"  # a training-only report: skipped
        "100,60,550,131.0,0.40\n"
        "200,120,500,124.9,0.50\n"
        "300,180,480,119.0,0.60\n"
        "400,240,470,121.0,0.58\n"
    )
    (run / "result.json").write_text(json.dumps({"wall_seconds": 330}))
    main([str(run), "--thresholds", "130", "125", "120", "118"])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| run | <= 130 | <= 125 | <= 120 | <= 118 |")
    assert table[2] == "| after | 2.0 min | 2.0 min | 3.0 min | - | 119.0 | 0.600 | 400 | 5.5 min |"
