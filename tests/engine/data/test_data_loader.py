"""The training iterator: batch contract, DP sharding, exact resume, workers, preference and RL batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from engine.data.loader import build_rl_prompt_iterator, build_train_iterator
from engine.data.sampler import ShardedSampler

from data_testutils import TINY_IMAGE_TOKEN_ID, tiny_config


def sft_cfg(demo_dir, **kw):
    base = dict(train_path=str(demo_dir / "sft.jsonl"), pack_window=8)
    base.update(kw)
    return tiny_config(**base)


def ids_of(batch) -> list[str]:
    return [i for row in batch["sample_ids"] for i in row]


def test_sampler_shards_are_disjoint_deterministic_and_resumable():
    n, dp = 103, 4
    shards = [ShardedSampler(n, r, dp, seed=5).shard(0) for r in range(dp)]
    flat = np.concatenate(shards)
    assert len(set(flat.tolist())) == len(flat) == (n // dp) * dp
    assert np.array_equal(ShardedSampler(n, 1, dp, seed=5).shard(0), shards[1])
    assert not np.array_equal(ShardedSampler(n, 1, dp, seed=5).shard(1), shards[1])  # new order each epoch
    s = ShardedSampler(n, 2, dp, seed=5)
    it = iter(s)
    full = [next(it) for _ in range(60)]  # crosses two epoch ends (25 per epoch)
    s2 = ShardedSampler(n, 2, dp, seed=5)
    it2 = iter(s2)
    head = [next(it2) for _ in range(37)]
    state = s2.state_dict()
    s3 = ShardedSampler(n, 2, dp, seed=5)
    s3.load_state_dict(state)
    it3 = iter(s3)
    assert head + [next(it3) for _ in range(23)] == full
    with pytest.raises(ValueError, match="same data file"):
        ShardedSampler(n + 1, 2, dp, seed=5).load_state_dict(state)


def test_batch_contract(demo_dir):
    cfg = sft_cfg(demo_dir, shuffle=False)
    cfg.train.micro_batch_size = 2
    batch = next(build_train_iterator(cfg))
    B, S = 2, cfg.train.seq_length
    for key, dtype in [("tokens", torch.int64), ("labels", torch.int64), ("loss_mask", torch.float32),
                       ("position_ids", torch.int64), ("segment_ids", torch.int64)]:
        assert batch[key].shape == (B, S) and batch[key].dtype == dtype, key
    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape[1:] == (3, 28, 28)
    assert batch["tiles_per_row"].tolist() == [int(t) for t in batch["tiles_per_row"]]
    assert batch["pixel_values"].shape[0] == int(batch["tiles_per_row"].sum())
    tpt = cfg.model.tokens_per_tile
    for b in range(B):
        assert int((batch["tokens"][b] == TINY_IMAGE_TOKEN_ID).sum()) == int(batch["tiles_per_row"][b]) * tpt
        seg = batch["segment_ids"][b]
        k = int(seg.max())
        assert k == len(batch["sample_ids"][b]) and k >= 1
        for s in range(1, k + 1):  # positions restart at 0 per sample
            assert torch.equal(batch["position_ids"][b][seg == s], torch.arange(int((seg == s).sum())))
    assert (batch["loss_mask"].sum(1) > 0).all()
    assert all(len(row) > 1 for row in batch["sample_ids"])  # 512-token rows hold several samples


def run_iter(cfg, n, state=None):
    it = build_train_iterator(cfg, state=state)
    out = []
    for _ in range(n):
        b = next(it)
        out.append((ids_of(b), b["tokens"].clone(), b["pixel_values"].clone()))
    return out, it.state_dict()


def test_resume_is_exact_across_windows_and_epochs(demo_dir):
    cfg = sft_cfg(demo_dir)
    full, _ = run_iter(cfg, 14)
    head, state = run_iter(cfg, 5)
    state = json.loads(json.dumps(state))  # must survive a checkpoint (JSON-able)
    tail, _ = run_iter(cfg, 9, state)
    for (ia, ta, pa), (ib, tb, pb) in zip(full, head + tail):
        assert ia == ib and torch.equal(ta, tb) and torch.equal(pa, pb)
    # one epoch = every sample of the shard exactly once (30 samples; rows of 512 hold ~3 each)
    epoch_ids = []
    it = build_train_iterator(cfg)
    while True:
        b = next(it)
        if it.state_dict()["sampler"]["epoch"] > 0:
            break
        epoch_ids += ids_of(b)
    assert sorted(epoch_ids) == sorted(f"vr-{k:06d}" for k in range(30))


def _rank_ids(rank, cfg_kwargs, demo_dir, queue):
    cfg = sft_cfg(demo_dir, **cfg_kwargs)
    it = build_train_iterator(cfg, dp_rank=rank, dp_size=2)
    ids = []
    while it.state_dict()["sampler"]["epoch"] == 0:
        b = next(it)
        if it.state_dict()["sampler"]["epoch"] == 0:
            ids += ids_of(b)
    queue.put((rank, ids))


@pytest.mark.slow
def test_two_dp_ranks_read_disjoint_shards(demo_dir):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_ids, args=(r, {"pack_window": 4}, demo_dir, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(got[0]) == len(got[1]) == 15
    assert not set(got[0]) & set(got[1])
    assert set(got[0]) | set(got[1]) == {f"vr-{k:06d}" for k in range(30)}


@pytest.mark.parametrize("pipeline", ["pil", "dali"])
def test_workers_give_the_same_batches(demo_dir, pipeline):
    a, _ = run_iter(sft_cfg(demo_dir, image_pipeline=pipeline, num_workers=0), 3)
    b, _ = run_iter(sft_cfg(demo_dir, image_pipeline="pil", num_workers=1), 3)
    for (ia, ta, pa), (ib, tb, pb) in zip(a, b):
        assert ia == ib and torch.equal(ta, tb)
        assert pa.shape == pb.shape and (pa - pb).abs().mean() < 0.05  # DALI vs PIL: parity bound, not bit-exact


def test_preference_rows_pair_up(demo_dir):
    cfg = tiny_config(train_path=str(demo_dir / "preference.jsonl"), format="preference", packing=False)
    cfg.train.micro_batch_size = 2
    batch = next(build_train_iterator(cfg))
    assert batch["tokens"].shape[0] == 4 and batch["pair_index"].tolist() == [0, 0, 1, 1]
    assert batch["sample_ids"][0] == batch["sample_ids"][1] != batch["sample_ids"][2]
    assert batch["scores"].tolist() == [1.0, 0.0, 1.0, 0.0]
    t = batch["tokens"]
    L = [int((batch["segment_ids"][r] > 0).sum()) for r in range(4)]
    first_learn = [int(torch.nonzero(batch["loss_mask"][r])[0]) for r in range(4)]
    assert first_learn[0] == first_learn[1]  # same prompt ...
    assert torch.equal(t[0, : first_learn[0] + 1], t[1, : first_learn[0] + 1])
    assert not torch.equal(t[0, : L[0]], t[1, : L[1]])  # ... different responses
    assert batch["pixel_values"].shape[0] == int(batch["tiles_per_row"].sum())
    assert batch["tiles_per_row"][0] == batch["tiles_per_row"][1]


def test_rl_prompts(demo_dir):
    cfg = tiny_config(train_path=str(demo_dir / "rl.jsonl"), format="rl", packing=False, shuffle=False)
    batch = next(build_rl_prompt_iterator(cfg, batch_size=3))
    assert batch["tokens"].shape[0] == 3 and batch["answers"][0] == json.loads(
        (demo_dir / "rl.jsonl").read_text().splitlines()[0])["answer"]
    assert "labels" not in batch and len(batch["prompt_ids"][1]) == int(batch["prompt_lengths"][1])
    assert batch["pixel_values"].shape[0] == int(batch["tiles_per_row"].sum())
    assert all(p[0].endswith(".png") for p in batch["image_paths"])


def test_select_rl_rows_regroups_rows_with_their_tiles(demo_dir):
    from engine.data.batch import select_rl_rows

    cfg = tiny_config(train_path=str(demo_dir / "rl.jsonl"), format="rl", packing=False, shuffle=False)
    it = build_rl_prompt_iterator(cfg, batch_size=3)
    a, b = next(it), next(it)
    out = select_rl_rows([a, b], [(1, 2), (0, 0), (1, 0)], pad_id=-7)

    def tiles(batch, row):
        start = int(batch["tiles_per_row"][:row].sum())
        return batch["pixel_values"][start: start + int(batch["tiles_per_row"][row])]

    for k, (src, row) in enumerate([(b, 2), (a, 0), (b, 0)]):
        assert out["sample_ids"][k] == src["sample_ids"][row] and out["answers"][k] == src["answers"][row]
        assert out["prompt_ids"][k] == src["prompt_ids"][row] and out["image_paths"][k] == src["image_paths"][row]
        n = len(src["prompt_ids"][row])
        assert out["tokens"][k, :n].tolist() == src["prompt_ids"][row] and (out["tokens"][k, n:] == -7).all()
        assert torch.equal(tiles(out, k), tiles(src, row)) and int(out["prompt_lengths"][k]) == n


def _mixed_set(demo_dir, tmp_path, bad_every: int):
    """The demo set with every `bad_every`-th sample broken: half at planning (bad JSON field), half at decode
    (an image whose header is fine and whose pixel data is destroyed)."""
    from data_testutils import write_jsonl

    good_png = next((demo_dir / "images").glob("*.png")).read_bytes()
    broken = tmp_path / "broken.png"
    broken.write_bytes(good_png[:100] + bytes(len(good_png) - 112) + good_png[-12:])  # IDAT zeroed, IEND kept
    rows = []
    for k, line in enumerate((demo_dir / "sft.jsonl").read_text().splitlines()):
        row = json.loads(line)
        row["image"] = str(demo_dir / row["image"])
        if k % bad_every == 0:
            row["image"] = str(broken)
        elif k % bad_every == 1:
            row["conversations"] = []
        rows.append(row)
    return write_jsonl(tmp_path / "mixed.jsonl", rows)


def test_skip_counts_are_exact_at_every_position_and_after_a_resume(demo_dir, tmp_path):
    """Skips count with the micro-batch they fall in (planning skips with the window's first one), so a state
    saved mid-window and resumed gives the same totals as an uninterrupted run: nothing counted twice."""
    cfg = sft_cfg(demo_dir, train_path=str(_mixed_set(demo_dir, tmp_path, 5)), on_error="skip", shuffle=False)
    it = build_train_iterator(cfg)
    totals = []
    for _ in range(12):
        next(it)
        totals.append(dict(it.skips.counts))
    assert totals[-1]["bad_field"] > 0 and totals[-1]["corrupt_image"] > 0
    head = build_train_iterator(cfg)
    for _ in range(4):
        next(head)
    carried, state = dict(head.skips.counts), json.loads(json.dumps(head.state_dict()))
    assert state["done_in_window"] >= 1  # mid-window: the window is re-planned on resume
    tail = build_train_iterator(cfg, state=state)
    for step in range(4, 12):
        next(tail)
        resumed = {k: carried.get(k, 0) + tail.skips.counts.get(k, 0) for k in set(carried) | set(tail.skips.counts)}
        assert resumed == totals[step], step


def test_every_image_failing_to_decode_stops_after_one_epoch_naming_the_file(demo_dir, tmp_path):
    cfg = sft_cfg(demo_dir, train_path=str(_mixed_set(demo_dir, tmp_path, 1)), on_error="skip")
    it = build_train_iterator(cfg)
    steps = 0
    with pytest.raises(Exception, match=rf"no sample of this rank's shard of {tmp_path / 'mixed.jsonl'} could be "
                                        r"loaded in epoch 0 \(skipped: \{'corrupt_image': 30\}\)") as e:
        while True:
            batch = next(it)
            assert float(batch["loss_mask"].sum()) == 0.0  # nothing to learn: the trainer skips such steps
            steps += 1
    assert e.value.reason == "no_valid_samples" and steps >= 1
