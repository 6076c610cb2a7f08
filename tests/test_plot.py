"""plot.py: metrics.jsonl (with a line torn by a kill) to a PNG; a missing run is one clear line."""
import json

import pytest
from PIL import Image

import plot


def test_plot_renders_every_record_and_skips_a_torn_line(tmp_path):
    records = [{"step": s, "mse_u": 1 / s, "mse_v": 2 / s, "loss_u": 1.0, "loss_v": 1.0, "du_dt_norm": 0.1 * s,
                "grad_norm": 0.5, "img_per_s": 80.0, "mse_u_t0.00-0.25": 0.1 / s} for s in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "mse'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert [r["step"] for r in plot.read_metrics(str(tmp_path))] == [1, 2, 3]
    plot.main([str(tmp_path)])
    with Image.open(tmp_path / "metrics.png") as image:
        assert image.format == "PNG" and image.size == (1500, 800)


def test_a_missing_or_empty_run_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="metrics.jsonl not found"):
        plot.main([str(tmp_path / "nowhere")])
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no records yet"):
        plot.main([str(tmp_path)])
