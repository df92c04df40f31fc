"""torchrun worker for test_device_placement.py: one real training step of a stage (MPO: policy, frozen reference,
DDP, optimizer; GRPO: the same plus native-engine rollouts and the old/reference log-prob passes) with every
placement helper of engine.parallel.device watched. Writes what it saw as JSON.

A forgotten placement shows as a module or tensor that reached the model / loss / a collective without passing
through place_module / place_batch / global_sum (on a GPU it would be on the host while the rest is on the GPU).
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))  # tests.helpers


def main(recipe: str, data: str, run_dir: str, out: str, *overrides: str) -> None:
    from engine.config import load_config
    from engine.model.vlm import VLM
    from engine.parallel import device
    from engine.parallel.wrap import unwrap
    from engine.rollout import native
    from engine.train import grpo, mpo

    from tests.helpers.placement_tracker import PlacementTracker

    tracker = PlacementTracker()  # which tensors would be on the GPU, through every op
    placed_modules, placed_tensors, problems = set(), set(), []
    counts = {"forward": 0, "loss": 0, "global_sum": 0, "engine_all_reduce": 0, "rollout_forward": 0}

    def watch(name, fn, record):
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            if name != "place_module":  # on a GPU a placed tensor is a new one: the host original stays behind
                result = tracker.placed_copy(result)
            record(result)
            return result
        setattr(device, name, wrapper)

    watch("place_module", device.place_module, lambda m: (placed_modules.add(id(m)), tracker.mark_module(m)))
    watch("place_batch", device.place_batch, lambda b: placed_tensors.update(id(v) for v in _tensors(b)))
    watch("place_tensor", device.place_tensor, lambda t: placed_tensors.add(id(t)))
    native.place_tensor = device.place_tensor  # imported by name there
    original_global_sum = device.global_sum

    def global_sum(values, group=None):
        counts["global_sum"] += 1
        return original_global_sum(values, group)
    device.global_sum = global_sum

    def check(where: str, tensors: dict):
        for key, t in tensors.items():
            if id(t) not in placed_tensors:
                problems.append(f"{where}: {key} did not come from place_batch")

    vlm_forward = VLM.forward

    def forward(self, tokens, position_ids, attention_mask=None, pixel_values=None, tiles_per_row=None,
                sample_ids=None, packed_seq_params=None):
        counts["forward"] += 1
        got = {"tokens": tokens, "position_ids": position_ids, "pixel_values": pixel_values,
               "tiles_per_row": tiles_per_row}
        if packed_seq_params is not None:
            got["cu_seqlens_q"] = packed_seq_params.cu_seqlens_q
        check("VLM.forward", {k: v for k, v in got.items() if v is not None})
        return vlm_forward(self, tokens, position_ids, attention_mask, pixel_values, tiles_per_row, sample_ids,
                           packed_seq_params)
    VLM.forward = forward

    def watch_loss(module, name):
        fn = getattr(module, name)

        def loss_inputs(batch, *args, **kwargs):
            counts["loss"] += 1
            check("loss", {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
            return fn(batch, *args, **kwargs)
        setattr(module, name, loss_inputs)
    watch_loss(mpo, "packed_sequence_logprobs")
    watch_loss(grpo, "grpo_loss")
    watch_loss(grpo, "token_logprobs_loss")

    native_logits = native.NativeRolloutEngine._logits

    def rollout_logits(self, tokens, positions, mask, rope, ctx, tiles, tiles_per_row):
        counts["rollout_forward"] += 1  # what it reads is checked by the tracker (views and masks of placed tensors)
        return native_logits(self, tokens, positions, mask, rope, ctx, tiles, tiles_per_row)
    native.NativeRolloutEngine._logits = rollout_logits

    all_reduce = dist.all_reduce

    def watched_all_reduce(tensor, *args, **kwargs):
        caller = Path(inspect.stack()[1].filename).resolve()
        if REPO / "engine" in caller.parents:
            counts["engine_all_reduce"] += 1
            if caller != REPO / "engine" / "parallel" / "device.py":
                problems.append(f"all_reduce on a tensor built in {caller.relative_to(REPO)} (use device.global_sum)")
        return all_reduce(tensor, *args, **kwargs)
    dist.all_reduce = watched_all_reduce

    cfg = load_config(REPO / "recipes" / f"{recipe}.yaml", [f"data.train_path={data}", f"train.run_dir={run_dir}",
                                                             "train.max_steps=1", *overrides])
    with tracker:
        trainer = (grpo.GRPOTrainer if cfg.train.stage == "grpo" else mpo.MPOTrainer)(cfg)
        trainer.fit()  # one step, then the final checkpoint
    problems += tracker.problems
    modules = {name: unwrap(value) for name, value in vars(trainer).items()
               if isinstance(value, torch.nn.Module) and any(True for _ in value.parameters())}
    for name, module in modules.items():
        if id(module) not in placed_modules:
            problems.append(f"trainer.{name} ({type(module).__name__}) was not placed with place_module")
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"problems": problems, "counts": counts, "modules": sorted(modules),
                                         "mixed_ops": tracker.mixed_ops}))
    from engine.parallel.init import shutdown

    shutdown()


def _tensors(batch: dict):
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            yield value
        elif hasattr(value, "cu_seqlens_q"):  # PackedSeqParams
            yield from (t for t in (value.cu_seqlens_q, value.cu_seqlens_kv) if t is not None)


if __name__ == "__main__":
    main(*sys.argv[1:])
