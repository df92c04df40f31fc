"""Every module, batch and collective buffer of a training step goes through engine.parallel.device, and no
operation mixes what would be on the GPU with what would be left on the host.

On the CPU every device is the CPU, so a forgotten `.to(device)` cannot show as a device mismatch here. Instead the
worker runs one real MPO step (policy, frozen reference, DDP, distributed optimizer, checkpoint), and one GRPO
episode (native-engine rollouts, old and KL-reference log-prob passes, the GRPO loss, the episode metrics), with
the placement helpers watched, and with tests/helpers/placement_tracker.py following "placed" through every torch
operation: it reports each operation that reads a placed tensor and a host one (what CUDA refuses). Without the
native engine's and the GRPO metrics' placement fixes the GRPO case reports 14 such operations.
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


@pytest.mark.slow
def test_grpo_episode_places_rollout_inputs_reference_and_batches(demo_data, tmp_path):
    out = tmp_path / "placement.json"
    torchrun(WORKER, ["tiny_cpu_grpo", str(demo_data / "rl.jsonl"), str(tmp_path / "run"), str(out),
                      "train.init_from=", "rollout.backend=native", "algorithm.grpo.kl_coef=0.01",
                      "algorithm.grpo.max_response_length=8", "algorithm.grpo.dynamic_sampling=false"], nproc=1)
    report = json.loads(out.read_text())
    assert report["problems"] == []
    assert {"model", "ddp", "reference"} <= set(report["modules"])  # the policy, its DDP wrapper, the KL reference
    counts = report["counts"]
    # prefill + decode steps of the native engine; old, reference and policy passes; the GRPO losses
    assert counts["rollout_forward"] >= 2 and counts["forward"] >= 3 and counts["loss"] >= 3
    assert counts["engine_all_reduce"] == counts["global_sum"]
