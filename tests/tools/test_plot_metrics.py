import json
import subprocess
import sys

from PIL import Image

from tests.helpers.torchrun import REPO


def test_plot_metrics_draws_a_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 5.0 / s, "lr": 1e-3}) + "\n" for s in range(1, 6)))
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, "tools/plot_metrics.py", str(metrics), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size[0] > 200


def test_plot_metrics_names_the_bad_line(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    proc = subprocess.run([sys.executable, "tools/plot_metrics.py", str(metrics), "--out", str(tmp_path / "x.png")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0 and f"{metrics}:2: not a JSON line" in proc.stderr
