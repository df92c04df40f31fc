"""The tiny GRPO recipe learns: from a short SFT run, 2 processes, vLLM rollouts, fixed seeds, its mean
reward over the last episodes is clearly above the first ones, with the Selective Sample Buffer on and off; and
the output layer fused into the GRPO loss (train.loss_impl=fused_linear) trains like the logits path.

Measured on this 2-core machine (the numbers the test prints): see docs/rl.md. These curves take ~10 minutes on 2
cores, so they are marked `long` and run by `make test-long`, not by `make test` (CI's ~25-minute budget). What
`make test` keeps of the GRPO loop: every stage and metric with both engines (test_grpo.py), the update's direction
(test_grpo_direction.py), packed == unpacked and the NaN skip (test_grpo_step.py), the loss modes
(test_grpo_batch.py), decoding modes (test_grpo_episode.py) and bit-exact resume (test_resume.py).
"""

from __future__ import annotations

import pytest

from tests.engine.train.test_resume import finish
from tests.engine.train.test_stages import records, run_recipe

pytestmark = [pytest.mark.slow, pytest.mark.long]

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


def test_tiny_grpo_with_the_output_layer_fused_into_the_loss_matches_fused(sft_run, demo_data, tmp_path):
    """train.loss_impl=fused_linear (hidden states + output weight into the kernel, the native engine switching the
    output layer back to logits to generate) against loss_impl=fused, from the same SFT policy and seeds. Episode 1
    rolls out the same weights, so its rollouts, reward and loss are identical and its gradient norm equal to
    fp32 summation order; afterwards the two policies differ by rounding only, which sampling can amplify, so later
    episodes are compared as curves (the 24-episode comparison is in docs/rl.md)."""
    runs = {}
    for impl in ("fused", "fused_linear"):
        run_dir = tmp_path / impl
        finish(run_recipe("tiny_cpu_grpo", run_dir, [
            f"data.train_path={demo_data / 'rl.jsonl'}", f"train.init_from={sft_run}", "train.max_steps=4",
            f"train.loss_impl={impl}", "rollout.backend=native"]), timeout=900)
        runs[impl] = records(run_dir)
    want, got = runs["fused"], runs["fused_linear"]
    assert len(want) == len(got) == 4
    assert got[0]["reward_mean_all"] == want[0]["reward_mean_all"] and got[0]["samples"] == want[0]["samples"]
    assert got[0]["loss"] == pytest.approx(want[0]["loss"], rel=1e-5, abs=1e-7)
    assert got[0]["grad_norm"] == pytest.approx(want[0]["grad_norm"], rel=1e-4), (got[0], want[0])
    assert want[0]["grad_norm"] > 0  # the episode had signal: the comparison means something
    for w, g in zip(want, got):
        assert abs(g["reward_mean_all"] - w["reward_mean_all"]) < 0.2, ([r["reward_mean_all"] for r in want],
                                                                        [r["reward_mean_all"] for r in got])
