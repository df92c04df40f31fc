"""metrics.jsonl on resume: lines after the checkpoint are dropped, a torn last line is dropped with a warning."""

from __future__ import annotations

import json
import logging

from engine.train.metrics import MetricsWriter


def test_torn_last_line_is_dropped_with_a_warning_on_resume(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 5, "loss": 0.1')  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="engine.train.metrics"):
        writer = MetricsWriter(tmp_path, total_steps=10, start_step=3, tensorboard=False)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert "dropped 1 line(s) that are not JSON (line 5" in caplog.text
    writer.log({"step": 4, "loss": 0.2})
    writer.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
