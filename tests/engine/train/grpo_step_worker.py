"""torchrun worker (2 processes, DP=2): the real GRPOTrainer (tiny recipe model, DDP, distributed optimizer) on
rollouts of real demo prompts with fixed random responses.

  1. packed vs unpacked: the same samples as packed rows (several per row) and one per row give the same GRPO
     loss and the same gradients through model + megatron schedule + fused loss (per-sample aggregation);
  2. a NaN loss (NaN advantages on rank 0) in a GRPO optimizer step is skipped on every rank and counted,
     the weights stay as they were, and the next finite step is taken.
Writes <out>/rank<r>.json.
"""

import json
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root, for tests.* helpers


def rollouts(trainer, n_per_prompt: int, seed: int):
    from engine.train.grpo_episode import Rollout

    batch = trainer.prompts.next()
    g = torch.Generator().manual_seed(seed)
    offsets = [0] + torch.cumsum(batch["tiles_per_row"], 0).tolist()
    rows = []
    for i, prompt in enumerate(batch["prompt_ids"]):
        for j in range(n_per_prompt):
            n = int(torch.randint(4, 40, (1,), generator=g))
            rows.append(Rollout(sample_id=f"{batch['sample_ids'][i][0]}#{j}", group=i, prompt_ids=list(prompt),
                                response_ids=torch.randint(10, 860, (n,), generator=g).tolist(),
                                rollout_logprobs=(-3.0 - torch.rand(n, generator=g)).tolist(),
                                tiles=batch["pixel_values"][offsets[i]: offsets[i + 1]], response_text="",
                                prompt_text="", gold="", in_loss=j != 1))
    return rows, torch.randn(len(rows), generator=g)


def micro_batches(trainer, rows, adv, pack: bool, seq_length: int):
    from engine.train.grpo_batch import even_over_ranks, pack_rollouts

    c = trainer.cfg
    micro = pack_rollouts(rows, adv, seq_length, c.train.micro_batch_size, trainer.data.ctx.tokenizer.pad_id,
                          c.model.tokens_per_tile, c.model.image_token_id, c.model.vision.image_size, pack=pack)
    (micro,) = even_over_ranks([micro], trainer.pg.dp)
    for mb in micro:  # the engine's log-probs as the old policy: identical per token in both layouts
        mb["old_logprobs"], mb["ref_logprobs"] = mb["rollout_logprobs"].clone(), None
    return micro


def loss_and_grads(trainer, micro):
    from engine.parallel.full_state import full_state
    from engine.parallel.wrap import unwrap
    from engine.train.grpo_loss import grpo_loss
    from engine.train.step import forward_backward

    c = trainer.cfg
    trainer.ddp.zero_grad_buffer()
    reports = forward_backward(trainer.ddp, micro, trainer.pg, lambda b: partial(
        grpo_loss, b, trainer.pg.tp, c.model.llm.vocab_size, c.algorithm.grpo, c.train.loss_impl))
    total, count = trainer._global_sum([sum(float(r["loss_sum"]) for r in reports),
                                        sum(float(r["count"]) for r in reports)])
    return total / count, full_state(unwrap(trainer.ddp), trainer.pg.tp, c.model.llm.vocab_size, grads=True)


def main(out: str, data: str, run_dir: str, mode: str) -> None:
    from engine.config import load_config
    from engine.parallel.init import shutdown
    from engine.train.grpo import GRPOTrainer

    cfg = load_config("recipes/tiny_cpu_grpo.yaml", [
        f"data.train_path={data}", "train.init_from=", f"train.run_dir={run_dir}", "rollout.backend=native",
        f"algorithm.grpo.loss_agg_mode={mode}", "algorithm.grpo.clip_eps_high=0.28", "optim.lr=1e-3"])
    trainer = GRPOTrainer(cfg)
    rank = torch.distributed.get_rank()
    rows, adv = rollouts(trainer, 4, seed=rank)
    result = {"rows": len(rows)}

    packed = micro_batches(trainer, rows, adv, pack=True, seq_length=512)
    unpacked = micro_batches(trainer, rows, adv, pack=False, seq_length=cfg.train.seq_length)
    result["samples_per_row"] = max(len(ids) for mb in packed for ids in mb["sample_ids"])
    loss_p, grads_p = loss_and_grads(trainer, packed)
    loss_u, grads_u = loss_and_grads(trainer, unpacked)
    result["loss_packed"], result["loss_unpacked"] = loss_p, loss_u
    result["max_grad_diff"] = max(float((grads_p[k] - grads_u[k]).abs().max()) for k in grads_u)
    result["max_grad"] = max(float(g.abs().max()) for g in grads_u.values())
    result["grad_keys_equal"] = sorted(grads_p) == sorted(grads_u)

    # 2. a NaN loss on one rank: skipped (all ranks), counted, weights untouched; then a finite step is taken
    nan_step = micro_batches(trainer, rows, adv, pack=True, seq_length=512)
    if rank == 0:
        nan_step[0]["advantages"] = torch.full_like(nan_step[0]["advantages"], float("nan"))
    before = {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if torch.is_tensor(v)}
    _, norms_nan, skipped_nan = trainer.gradient_steps([nan_step])
    unchanged = all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items() if k in before)
    result.update(skipped_nan=skipped_nan, steps_taken_nan=len(norms_nan), weights_unchanged=unchanged,
                  skipped_steps=trainer.skipped_steps, bad_in_a_row=trainer.bad_steps_in_a_row)
    _, norms_ok, skipped_ok = trainer.gradient_steps([micro_batches(trainer, rows, adv, pack=True, seq_length=512)])
    changed = any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items() if k in before)
    result.update(skipped_ok=skipped_ok, steps_taken_ok=len(norms_ok), weights_changed=changed,
                  skipped_steps_after=trainer.skipped_steps, bad_in_a_row_after=trainer.bad_steps_in_a_row)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    trainer.metrics.close()
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
