"""GRPO optimizer steps through the real trainer on 2 processes: packed rows train exactly like one sample per
row (loss and gradients, per-sample aggregation), and a NaN loss is skipped on every rank and counted."""

import json
from pathlib import Path

import pytest

from engine.data.visual_reasoning import write_demo_set
from tests.helpers.torchrun import torchrun

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("grpo_step_worker.py")


def test_packed_equals_unpacked_and_a_nan_step_is_skipped(tmp_path):
    """seq-mean-token-mean: the mode where aggregating per row instead of per sample would show (every mode is
    checked against the kernel reference on packed rows in test_grpo_batch.py, without the model)."""
    write_demo_set(tmp_path / "data", 8, seed=0)
    torchrun(WORKER, [str(tmp_path), str(tmp_path / "data" / "rl.jsonl"), str(tmp_path / "run"),
                      "seq-mean-token-mean"], nproc=2, timeout=400)
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        print(f"rank {rank}:", json.dumps(r))
        assert r["samples_per_row"] > 1, r  # the packed layout really packs
        assert r["loss_packed"] == pytest.approx(r["loss_unpacked"], rel=1e-5), r
        assert r["grad_keys_equal"] and r["max_grad_diff"] <= 1e-5 * r["max_grad"], r
        # NaN advantages on rank 0 only: both ranks skip the step together and count it
        assert r["skipped_nan"] and r["steps_taken_nan"] == 0 and r["weights_unchanged"], r
        assert r["skipped_steps"] == 1 and r["bad_in_a_row"] == 1, r
        assert not r["skipped_ok"] and r["steps_taken_ok"] == 1 and r["weights_changed"], r
        assert r["skipped_steps_after"] == 1 and r["bad_in_a_row_after"] == 0, r
