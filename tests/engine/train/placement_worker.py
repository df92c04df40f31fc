"""torchrun worker for test_device_placement.py: one real MPO training step (policy, frozen reference, DDP,
optimizer) with every placement helper of engine.parallel.device watched. Writes what it saw as JSON.

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


def main(recipe: str, data: str, run_dir: str, out: str) -> None:
    from engine.config import load_config
    from engine.model.vlm import VLM
    from engine.parallel import device
    from engine.parallel.wrap import unwrap
    from engine.train import mpo

    placed_modules, placed_tensors, problems = set(), set(), []
    counts = {"forward": 0, "loss": 0, "global_sum": 0, "engine_all_reduce": 0}

    def watch(name, fn, record):
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            record(result)
            return result
        setattr(device, name, wrapper)

    watch("place_module", device.place_module, lambda m: placed_modules.add(id(m)))
    watch("place_batch", device.place_batch, lambda b: placed_tensors.update(
        id(v) for v in _tensors(b)))
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

    seq_logps = mpo.packed_sequence_logprobs

    def loss_inputs(batch, *args):
        counts["loss"] += 1
        check("loss", {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
        return seq_logps(batch, *args)
    mpo.packed_sequence_logprobs = loss_inputs

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
                                                             "train.max_steps=1"])
    trainer = mpo.MPOTrainer(cfg)
    trainer.fit()  # one step, then the final checkpoint
    modules = {name: unwrap(value) for name, value in vars(trainer).items()
               if isinstance(value, torch.nn.Module) and any(True for _ in value.parameters())}
    for name, module in modules.items():
        if id(module) not in placed_modules:
            problems.append(f"trainer.{name} ({type(module).__name__}) was not placed with place_module")
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"problems": problems, "counts": counts, "modules": sorted(modules)}))
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
