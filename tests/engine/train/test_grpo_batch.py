"""GRPO rows: rollouts packed to train.seq_length in the SFT batch contract, the per-token GRPO fields
following them, and the trainer's loss path (engine/train/grpo_loss.py) on a packed micro-batch equal to
the kernel reference on one sample per row, for every aggregation mode."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import load_config
from engine.config.algorithm import AGG_MODES, GRPOConfig
from engine.data.loader import build_rl_prompt_iterator
from engine.data.visual_reasoning import write_demo_set
from engine.train.grpo_batch import check_fits, pack_rollouts, row_fill, without_loss
from engine.train.grpo_episode import Rollout
from engine.train.grpo_loss import grpo_loss

PROMPTS, G, MAX_RESPONSE = 16, 4, 96  # the tiny recipe's response budget


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The tiny GRPO recipe's geometry (112 px tiles, 16 tokens each) on generated prompts with their tiles,
    and G rollouts per prompt with random responses of 1..96 tokens (some cut, some forced, some masked)."""
    out = tmp_path_factory.mktemp("grpo_batch")
    write_demo_set(out, PROMPTS, seed=0)
    cfg = load_config("recipes/tiny_cpu_grpo.yaml", [f"data.train_path={out / 'rl.jsonl'}", "data.max_samples=0",
                                                     "data.shuffle=false"])
    batch = next(build_rl_prompt_iterator(cfg, PROMPTS))
    g = torch.Generator().manual_seed(0)
    offsets = [0] + torch.cumsum(batch["tiles_per_row"], 0).tolist()
    rows = []
    for i, prompt in enumerate(batch["prompt_ids"]):
        for j in range(G):
            n = int(torch.randint(1, MAX_RESPONSE + 1, (1,), generator=g))
            response = torch.randint(10, 860, (n,), generator=g).tolist()
            sampled = None
            if (i + j) % 5 == 0 and n > 3:  # a budget-mode sample: two forced tokens in the middle
                sampled = [True] * n
                sampled[1] = sampled[2] = False
            rows.append(Rollout(
                sample_id=f"{batch['sample_ids'][i][0]}#0.{j}", group=i, prompt_ids=list(prompt), response_ids=response,
                rollout_logprobs=(-torch.rand(n, generator=g)).tolist(), tiles=batch["pixel_values"][offsets[i]:offsets[i + 1]],
                response_text="", prompt_text="", gold="", in_loss=(i + j) % 7 != 3, sampled=sampled))
    advantages = torch.randn(len(rows), generator=g)
    return cfg, rows, advantages


def _pack(cfg, rows, advantages, seq_length=None, micro=None, pack=True):
    c = cfg
    return pack_rollouts(rows, advantages, seq_length or c.train.seq_length, micro or c.train.micro_batch_size, 0,
                         c.model.tokens_per_tile, c.model.image_token_id, c.model.vision.image_size, pack=pack)


def _positions(micro: list[dict]) -> dict[str, tuple[int, int, slice]]:
    """sample id -> (micro-batch, row, columns) from the batch contract alone (sample_ids + segment_ids)."""
    out = {}
    for m, mb in enumerate(micro):
        for b, ids in enumerate(mb["sample_ids"]):
            for k, sid in enumerate(ids):
                cols = (mb["segment_ids"][b] == k + 1).nonzero().flatten()
                out[sid] = (m, b, slice(int(cols[0]), int(cols[-1]) + 1))
    return out


def test_packed_rows_follow_the_sft_contract(demo):
    cfg, rows, advantages = demo
    micro = _pack(cfg, rows, advantages, seq_length=1024, micro=2)
    pos = _positions(micro)
    assert sorted(pos) == sorted(r.sample_id for r in rows)  # every sample exactly once
    assert max(len(ids) for mb in micro for ids in mb["sample_ids"]) > 1  # rows really hold several samples
    for i, r in enumerate(rows):
        m, b, cols = pos[r.sample_id]
        mb, p, n = micro[m], len(r.prompt_ids), len(r.prompt_ids) + len(r.response_ids)
        assert mb["tokens"][b, cols].tolist() == r.prompt_ids + r.response_ids
        assert mb["position_ids"][b, cols].tolist() == list(range(n))  # restarting at 0 per sample
        assert mb["labels"][b, cols][: n - 1].tolist() == (r.prompt_ids + r.response_ids)[1:]
        response = slice(cols.start + p - 1, cols.start + n - 1)  # label positions predicting response tokens
        assert mb["loss_mask"][b, response].tolist() == [float(x) for x in r.learned()]
        assert float(mb["loss_mask"][b, cols].sum()) == sum(r.learned())  # nothing outside the response
        assert bool((mb["sample_mask"][b, response] == 1).all()) and float(mb["sample_mask"][b, cols].sum()) == n - p
        assert torch.allclose(mb["advantages"][b, response], advantages[i].expand(n - p))
        assert mb["rollout_logprobs"][b, response].tolist() == pytest.approx(r.rollout_logprobs)
    for mb in micro:  # tiles in order of appearance, per row
        assert int(mb["tiles_per_row"].sum()) == mb["pixel_values"].shape[0]
        start = 0
        for b, ids in enumerate(mb["sample_ids"]):
            for sid in ids:
                tiles = next(r.tiles for r in rows if r.sample_id == sid)
                assert torch.equal(mb["pixel_values"][start: start + tiles.shape[0]], tiles)
                start += tiles.shape[0]
        assert bool((mb["segment_ids"] == 0).eq(mb["sample_mask"] == 0).logical_or(mb["segment_ids"] > 0).all())


def test_rows_are_packed_at_least_90_percent_full(demo):
    """A realistic row length (1-2k tokens; the 38B recipes use 16k for ~16 samples of up to 8k+ prompt):
    this episode's 64 rollouts fill >= 90% of the rows' token slots. One sample per row would fill ~40%."""
    cfg, rows, advantages = demo
    for seq_length in (1024, 2048):
        packed, unpacked = _pack(cfg, rows, advantages, seq_length), _pack(cfg, rows, advantages, seq_length, pack=False)
        print(f"seq {seq_length}: packed rows {sum(len(mb['sample_ids']) for mb in packed)} fill {row_fill(packed):.3f}"
              f"; unpacked rows {len(rows)} fill {row_fill(unpacked):.3f}")
        assert row_fill(packed) >= 0.9
        assert row_fill(unpacked) < 0.5


def test_a_sample_longer_than_a_row_is_an_error_naming_it(demo):
    cfg, rows, _ = demo
    with pytest.raises(ValueError, match=rf"{rows[0].sample_id}.*raise train.seq_length"):
        check_fits(rows[:1], len(rows[0].prompt_ids))


def _fill(micro, pos, per_sample: dict[str, torch.Tensor], key: str, shape_tail=()):
    """Write per-sample [n_i, ...] values into the layout of `micro` under `key`."""
    for mb in micro:
        B, S = mb["tokens"].shape
        mb[key] = torch.zeros(B, S, *shape_tail)
    for sid, values in per_sample.items():
        m, b, cols = pos[sid]
        micro[m][key][b, cols] = values


@pytest.mark.parametrize("mode,counts_empty", [(m, False) for m in AGG_MODES] + [("seq-mean-token-mean", True),
                                                                                  ("seq-mean-token-sum-norm", True)])
def test_packed_loss_path_equals_the_kernel_reference_unpacked(demo, mode, counts_empty):
    """grpo_loss (the fused kernel + kernels.aggregate_terms per segment) on packed rows == the torch
    reference (kernels.grpo_loss_reference + aggregate_loss) with one sample per row: value and gradient."""
    import kernels

    cfg, rows, advantages = demo
    rows, advantages = rows[:8], advantages[:8]  # Triton's interpreter is slow: 2 prompts' groups
    V = cfg.model.llm.vocab_size
    g = GRPOConfig(loss_agg_mode=mode, seq_mean_counts_empty=counts_empty, clip_eps_high=0.28, dual_clip_c=3.0,
                   kl_coef=0.05, max_response_length=MAX_RESPONSE, group_size=G, rollouts_per_episode=4 * G,
                   mini_batch_size=1)
    gen = torch.Generator().manual_seed(1)
    logits = {r.sample_id: torch.randn(len(r.prompt_ids) + len(r.response_ids), V, generator=gen) * 2 for r in rows}
    old = {sid: torch.randn(len(x), generator=gen) * 0.3 - 6.0 for sid, x in logits.items()}
    ref = {sid: torch.randn(len(x), generator=gen) * 0.3 - 6.0 for sid, x in logits.items()}

    def run(pack: bool):
        micro = _pack(cfg, rows, advantages, seq_length=512 if pack else 256, micro=64, pack=pack)
        pos = _positions(micro)
        leaves = {sid: x.clone().requires_grad_(True) for sid, x in logits.items()}
        _fill(micro, pos, old, "old_logprobs")
        _fill(micro, pos, ref, "ref_logprobs")
        (mb,) = micro
        full = torch.zeros(*mb["tokens"].shape, V)  # (B, S, V): the model output, padding columns 0
        for sid, x in leaves.items():
            _, b, cols = pos[sid]
            full[b, cols] = x
        return mb, full, leaves, pos

    mb, full, leaves, _ = run(pack=True)
    assert max(len(ids) for ids in mb["sample_ids"]) > 1  # rows hold several samples: per-row would differ
    loss_sum, count, _ = grpo_loss(mb, None, V, g, "fused", full)
    (loss_sum / count.float()).backward()
    packed_grads = {sid: x.grad for sid, x in leaves.items()}

    ub, ufull, uleaves, _ = run(pack=False)
    B, S, _ = ufull.shape
    per_token, _ = kernels.grpo_loss_reference(
        ufull.reshape(B * S, V), ub["labels"].reshape(-1), ub["old_logprobs"].reshape(-1), ub["advantages"].reshape(-1),
        ub["loss_mask"].reshape(-1), ub["ref_logprobs"].reshape(-1), clip_eps_low=g.clip_eps_low,
        clip_eps_high=g.clip_eps_high, dual_clip_c=g.dual_clip_c, kl_coef=g.kl_coef, kl_type=g.kl_estimator)
    expected = kernels.aggregate_loss(per_token.view(B, S), ub["loss_mask"], mode, max_length=g.max_response_length,
                                      sample_mask=ub["sample_mask"] if counts_empty else None)
    expected.backward()
    assert float(loss_sum / count) == pytest.approx(float(expected), rel=1e-5, abs=1e-7)
    if counts_empty:
        assert int(count) == len(rows)  # every sample counts, the overlong-masked ones with loss 0
    for sid, x in uleaves.items():
        torch.testing.assert_close(packed_grads[sid], x.grad, rtol=1e-4, atol=1e-7)


def test_dp_padding_copies_carry_no_loss_and_no_count(demo):
    cfg, rows, advantages = demo
    V = cfg.model.llm.vocab_size
    (mb,) = _pack(cfg, rows[:4], advantages[:4], seq_length=1024, micro=8)
    pad = without_loss(mb)
    pad["old_logprobs"] = torch.zeros_like(pad["loss_mask"])
    logits = torch.randn(*pad["tokens"].shape, V, requires_grad=True)
    for mode in AGG_MODES:
        g = GRPOConfig(loss_agg_mode=mode, seq_mean_counts_empty=mode != "token-mean", max_response_length=MAX_RESPONSE)
        loss_sum, count, _ = grpo_loss(pad, None, V, g, "reference", logits)
        assert float(loss_sum) == 0.0 and int(count) == 0, mode
    assert dataclasses.is_dataclass(rows[0])
