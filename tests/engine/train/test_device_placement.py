"""Every module, batch and collective buffer of a training step goes through engine.parallel.device.

On the CPU every device is the CPU, so a forgotten `.to(device)` cannot show as a device mismatch here. Instead the
worker runs one real MPO step (policy, frozen reference, DDP, distributed optimizer, checkpoint) with the
placement helpers watched, and reports any module, tensor or all-reduce that bypassed them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.torchrun import torchrun

WORKER = Path(__file__).with_name("placement_worker.py")


@pytest.mark.slow
def test_every_placement_goes_through_the_device_helper(demo_data, tmp_path):
    out = tmp_path / "placement.json"
    torchrun(WORKER, ["tiny_cpu_mpo", str(demo_data / "preference.jsonl"), str(tmp_path / "run"), str(out)], nproc=1)
    report = json.loads(out.read_text())
    assert report["problems"] == []
    assert {"model", "ddp", "reference"} <= set(report["modules"])  # the policy, its DDP wrapper, MPO's pi_0
    counts = report["counts"]
    # reference + policy forwards over the step's 4 micro-batches, losses on both, global sums
    assert counts["forward"] >= 4 and counts["loss"] >= 4 and counts["global_sum"] >= 2
    assert counts["engine_all_reduce"] == counts["global_sum"]
