"""The tiny SFT and MPO recipes train with train.loss_impl=fused_linear (the output layer fused into the loss;
the model returns hidden states) and log the same losses as loss_impl=fused (logits + Triton kernel).

Tolerance: the model is fp32 and both impls compute the same log-probs in another summation order
(chunked GEMMs, per-chunk online softmax): ~1e-7 relative on a step's loss and gradient. A few Adam steps
keep that below LOSS_RTOL; a wrong gradient (a missed TP reduction, a dropped chunk, the wrong weight)
moves the loss of step 2 onwards by orders of magnitude more.
"""

from __future__ import annotations

import pytest

from tests.engine.train.test_resume import finish
from tests.engine.train.test_stages import records, run_recipe

pytestmark = pytest.mark.slow
LOSS_RTOL = 1e-4
STEPS = 4
CASES = {
    # SFT at TP=2 (vocab-parallel weight shards, padded vocab 869 -> 1024) with packed rows.
    "sft-tp2": ("tiny_cpu_sft", "sft.jsonl", ["parallel.tensor_model_parallel_size=2"]),
    # MPO at DP=2: policy loss and the frozen reference's log-prob pass both go through the fused head.
    "mpo-dp2": ("tiny_cpu_mpo", "preference.jsonl", []),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_linear_recipe_matches_fused(case, demo_data, tmp_path):
    recipe, data_file, overrides = CASES[case]
    common = [f"data.train_path={demo_data / data_file}", f"train.max_steps={STEPS}", *overrides]
    runs = {}
    for impl in ("fused", "fused_linear"):
        run_dir = tmp_path / impl
        finish(run_recipe(recipe, run_dir, common + [f"train.loss_impl={impl}"]))
        runs[impl] = records(run_dir)
    want, got = runs["fused"], runs["fused_linear"]
    assert len(want) == len(got) == STEPS
    keys = ["loss", "grad_norm"] + (["loss_pref", "loss_gen", "reward_margin"] if recipe == "tiny_cpu_mpo" else [])
    for step, (w, g) in enumerate(zip(want, got), 1):
        for key in keys:
            assert g[key] == pytest.approx(w[key], rel=LOSS_RTOL, abs=1e-6), (case, step, key, g[key], w[key])
    assert want[-1]["loss"] != want[0]["loss"]  # the runs trained (steps differ), so equality means something
