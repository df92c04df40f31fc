"""torchrun worker: one GRPO update through the trainer's loss path (megatron schedule + fused kernel +
DDP + distributed optimizer) raises the log-prob of a positive-advantage response and lowers that of a
negative-advantage one. Writes the before/after sequence log-probs as JSON."""

import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root, for tests.* helpers


def main(out: str, tp: int) -> None:
    from engine.config import load_config
    from engine.model.build import build_for_this_stage
    from engine.parallel.init import initialize, shutdown
    from engine.parallel.wrap import wrap_ddp
    from engine.train.grpo_loss import grpo_loss, token_logprobs_loss
    from engine.train.optim import build_optimizer
    from engine.train.step import forward_backward
    from tests.engine.parallel.dist_worker import TINY

    cfg = load_config(None, TINY + [f"parallel.tensor_model_parallel_size={tp}", "optim.lr=1e-3",
                                    "optim.warmup_ratio=0", "optim.weight_decay=0"])
    pg = initialize(cfg.parallel, seed=3)
    ddp = wrap_ddp(build_for_this_stage(cfg, pg), cfg, pg)
    opt = build_optimizer(cfg, [ddp])
    g = cfg.algorithm.grpo
    S, vocab = 48, cfg.model.llm.vocab_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, vocab, (2, S), generator=gen)
    labels = torch.cat([tokens[:, 1:], torch.zeros(2, 1, dtype=torch.long)], dim=1)
    mask = torch.zeros(2, S)
    mask[:, 20:40] = 1.0  # the "response" tokens
    adv = torch.zeros(2, S)
    adv[0, 20:40], adv[1, 20:40] = 1.0, -1.0
    batch = dict(tokens=tokens, labels=labels, loss_mask=mask, advantages=adv, position_ids=torch.arange(S).repeat(2, 1),
                 segment_ids=torch.ones(2, S, dtype=torch.long), sample_mask=mask.clone(),
                 pixel_values=torch.zeros(0, 3, 56, 56), tiles_per_row=torch.zeros(2, dtype=torch.long),
                 sample_ids=[["pos"], ["neg"]])

    def seq_logps():
        with torch.no_grad():
            rep = forward_backward(ddp, [batch], pg,
                                   lambda b: partial(token_logprobs_loss, b, pg.tp, vocab, 1.0, "fused"),
                                   forward_only=True)
        return rep[0]["logprobs"]

    before = seq_logps()
    batch["old_logprobs"], batch["ref_logprobs"] = before, None
    ddp.zero_grad_buffer()
    opt.zero_grad()
    forward_backward(ddp, [batch], pg, lambda b: partial(grpo_loss, b, pg.tp, vocab, g, "fused"))
    ok, _, _ = opt.step()
    after = seq_logps()
    if dist.get_rank() == 0:
        s = lambda t: [(float((t[i] * mask[i]).sum())) for i in range(2)]  # noqa: E731
        json.dump({"ok": ok, "before": s(before), "after": s(after)}, open(out, "w"))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
