"""The GRPO update points the right way: positive advantage -> more likely, negative -> less likely."""

import json
from pathlib import Path

import pytest

from tests.helpers.torchrun import torchrun

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("tp", [1, 2])
def test_one_grpo_step_moves_logprobs_with_the_advantage_sign(tmp_path, tp):
    out = tmp_path / "result.json"
    torchrun(Path(__file__).with_name("grpo_direction_worker.py"), [str(out), str(tp)], nproc=tp)
    r = json.loads(out.read_text())
    assert r["ok"]
    assert r["after"][0] > r["before"][0] + 1e-3, r  # A = +1: log pi(response) goes up
    assert r["after"][1] < r["before"][1] - 1e-3, r  # A = -1: goes down
