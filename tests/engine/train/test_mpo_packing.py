"""MPO preference pairs are packed (both sequences of a pair in one micro-batch) and the MPO loss does not change.

Fill targets on the generated demo data (tools/make_demo_data.py): MPO rows and SFT rows hold >= 90% of
train.seq_length real tokens on average over an epoch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.config import load_config
from engine.data.batch import collate_preference, pack_preference_pairs
from engine.data.loader import build_train_iterator
from engine.model.build import build_for_this_stage
from engine.parallel.device import place_batch
from engine.rl.preference import mpo_loss
from engine.train.mpo import packed_sequence_logprobs
from engine.train.step import model_inputs
from tests.engine.model.conftest import single_process_pg  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[3]


def _cfg(recipe: str, data: Path, *extra: str):
    return load_config(REPO / "recipes" / f"{recipe}.yaml", [f"data.train_path={data}", "data.shuffle=false", *extra])


def _epoch_fill(cfg, num_samples: int) -> tuple[float, int]:
    """Real tokens / token slots of the rows of one DP=1 epoch of micro-batches, as the loader plans them (its
    batch sampler: the packing is decided there, before images are decoded). Returns (fill, pairs or samples)."""
    plans = build_train_iterator(cfg).plans
    preference = cfg.data.format == "preference"
    seen, real, slots, units = set(), 0, 0, 0
    for items in plans:
        marker, samples = items[-1], items[:-1]
        rows = 2 * marker.num_rows if preference else marker.num_rows
        real += sum(len(p) + (len(p.rejected.tokens) if preference else 0) for p in samples)
        slots += rows * cfg.train.seq_length
        units += len(samples)
        seen |= {p.id for p in samples}
        if len(seen) == num_samples:
            return real / slots, units
    raise AssertionError("unreachable: the plans never end")


def test_pair_packer_keeps_pairs_together_and_fits_rows():
    lengths = [(300, 200), (90, 80), (500, 10), (250, 250), (40, 30), (511, 511)]
    groups, layouts = pack_preference_pairs(lengths, rows_per_batch=2, seq_length=512)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group, layout in zip(groups, layouts):
        assert len(layout) == 2
        placed = sorted((k, which) for row in layout for k, which in row)
        assert placed == [(k, w) for k in range(len(group)) for w in (0, 1)]  # both sequences, once each
        for row in layout:
            assert sum(lengths[group[k]][which] for k, which in row) <= 512
    assert groups[0] == [5]  # the longest pair opens the first micro-batch and fills it
    with pytest.raises(ValueError, match="longer than seq_length"):
        pack_preference_pairs([(600, 10)], 2, 512)


def test_mpo_and_sft_rows_are_packed_on_demo_data(demo_data):
    mpo = _cfg("tiny_cpu_mpo", demo_data / "preference.jsonl")
    assert mpo.data.packing
    fill, pairs = _epoch_fill(mpo, 120)
    assert pairs == 120 and fill >= 0.90, f"MPO rows hold {fill:.1%} of seq_length"
    unpacked, _ = _epoch_fill(_cfg("tiny_cpu_mpo", demo_data / "preference.jsonl", "data.packing=false"), 120)
    assert unpacked < 0.5  # what packing saves: one ~110-token sequence per 512-token row
    sft = _cfg("tiny_cpu_sft", demo_data / "sft.jsonl")
    fill, _ = _epoch_fill(sft, 120)
    assert fill >= 0.90, f"SFT rows hold {fill:.1%} of seq_length"


def _mpo_terms(model, host_batch, vocab):
    """Per-sequence log-probs and the MPO loss summed over pairs (reference = the same model, detached)."""
    batch = place_batch(host_batch)
    logits = model(**model_inputs(batch))
    logps, lengths = packed_sequence_logprobs(batch, None, "reference", vocab, logits)
    ref = logps.detach() - 0.1  # any fixed reference: the loss then depends on the policy's log-probs
    out = mpo_loss(logps[0::2], logps[1::2], ref[0::2], ref[1::2], lengths[0::2], beta=0.1)
    return logps, out.loss * (logps.numel() // 2)


def test_mpo_loss_and_gradients_are_unchanged_by_packing(single_process_pg, demo_data):  # noqa: F811
    cfg = _cfg("tiny_cpu_mpo", demo_data / "preference.jsonl")
    vocab = cfg.model.llm.vocab_size
    it = build_train_iterator(cfg)
    packed = next(it)
    n_pairs = packed["pair_index"].numel() // 2
    assert packed["tokens"].shape == (2 * cfg.train.micro_batch_size, cfg.train.seq_length)
    assert int((packed["sequence_index"] >= 0).sum()) == int((packed["segment_ids"] > 0).sum())
    assert n_pairs >= 3 and int((packed["segment_ids"] > 1).sum()) > 0  # several pairs share rows
    # the same pairs, one sequence per row (the loader's samples, re-collated in the unpacked layout)
    loaded = {s.planned.id: s for s in _loaded_pairs(cfg, packed)}
    assert len(loaded) == n_pairs
    unpacked = collate_preference([loaded[i] for i in _pair_order(packed)], cfg.train.seq_length, 0,
                                  cfg.model.tokens_per_tile, cfg.model.image_token_id, cfg.model.vision.image_size)
    torch.manual_seed(0)
    model = build_for_this_stage(cfg, single_process_pg)
    results = []
    for batch in (packed, unpacked):
        model.zero_grad(set_to_none=True)
        logps, loss = _mpo_terms(model, batch, vocab)
        loss.backward()
        results.append((logps.detach(), float(loss), {n: p.grad.clone() for n, p in model.named_parameters()
                                                       if p.grad is not None}))
    (lp_p, loss_p, g_p), (lp_u, loss_u, g_u) = results
    torch.testing.assert_close(lp_p, lp_u, rtol=1e-5, atol=1e-5)
    assert abs(loss_p - loss_u) < 1e-5 * max(1.0, abs(loss_u))
    assert set(g_p) == set(g_u)
    for name in g_p:
        assert float((g_p[name] - g_u[name]).abs().max()) < 1e-5, name


def _pair_order(batch) -> list[str]:
    """Pair ids in the micro-batch's pair numbering (sequence 2k / 2k+1 = pair k), read back from its rows."""
    by_seq = {}
    for r, row_ids in enumerate(batch["sample_ids"]):
        for k, sid in enumerate(row_ids):
            j = int(batch["sequence_index"][r][batch["segment_ids"][r] == k + 1][0])
            by_seq[j] = sid
    return [by_seq[2 * p] for p in range(len(by_seq) // 2)]


def _loaded_pairs(cfg, batch):
    """LoadedSample of every pair in the batch, loaded again through the data context (same planner, same images)."""
    from engine.data.dataset import load_images
    from engine.data.loader import build_data_context

    ctx = build_data_context(cfg)
    wanted = set(_pair_order(batch))
    pipeline = ctx.make_pipeline()
    return [load_images(ctx.planner.plan(i), pipeline) for i in range(len(ctx.planner.source))
            if ctx.planner.source[i].id in wanted]
