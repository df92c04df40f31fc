"""The tiny GRPO recipe learns: from a short SFT run, 2 processes, vLLM rollouts, fixed seeds, its mean
reward over the last episodes is clearly above the first ones, with the Selective Sample Buffer on and off.

Measured on this 2-core machine (the numbers the test prints): see docs/rl.md.
"""

from __future__ import annotations

import pytest

from tests.engine.train.test_resume import finish
from tests.engine.train.test_stages import records, run_recipe

pytestmark = pytest.mark.slow

EPISODES, WINDOW, MIN_GAIN = 24, 6, 0.08


@pytest.fixture(scope="module")
def sft_run(demo_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("grpo_learns_sft")
    proc = run_recipe("tiny_cpu_sft", run_dir, [f"data.train_path={demo_data / 'sft.jsonl'}", "train.max_steps=200"])
    finish(proc, timeout=600)
    return run_dir


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.parametrize("ssb", [False, True], ids=["ssb_off", "ssb_on"])
def test_tiny_grpo_raises_mean_reward(ssb, sft_run, demo_data, tmp_path):
    proc = run_recipe("tiny_cpu_grpo", tmp_path, [
        f"data.train_path={demo_data / 'rl.jsonl'}", f"train.init_from={sft_run}", f"train.max_steps={EPISODES}",
        f"algorithm.ssb.enabled={str(ssb).lower()}",
    ])
    out = finish(proc, timeout=900)
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == list(range(1, EPISODES + 1)), out[-2000:]
    reward = [r["reward_mean_all"] for r in recs]  # the policy's reward on fresh rollouts, before filtering
    accuracy = [r["accuracy_all"] for r in recs]
    first, last = _mean(reward[:WINDOW]), _mean(reward[-WINDOW:])
    print(f"ssb={ssb}: mean reward episodes 1-{WINDOW} {first:.3f} -> {EPISODES - WINDOW + 1}-{EPISODES} {last:.3f}; "
          f"accuracy {_mean(accuracy[:WINDOW]):.3f} -> {_mean(accuracy[-WINDOW:]):.3f}")
    assert last > first + MIN_GAIN, (first, last, reward)
    assert _mean(accuracy[-WINDOW:]) > _mean(accuracy[:WINDOW]), accuracy
    if ssb:
        assert all("effective_sample_ratio_with_buffer" in r for r in recs)
