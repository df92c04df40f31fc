"""torchrun worker for the TP/PP equivalence and freezing tests (launched by test_parallel_equivalence.py).

Modes:
  reference   TP=1/PP=1: perturb the seeded init, save it as full tensors, run the batches.
  compare     any TP/PP: load that init, run the same batches, save loss/grads/logits as full tensors.
  freeze      build each freezing configuration, take one optimizer step, save which params moved.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

TINY = [
    # vision: 56px tiles, 14px patches -> 16 patches -> 4 tokens per tile after pixel shuffle
    "model.vision.image_size=56", "data.tile_size=56", "data.max_tiles=2",
    "model.vision.patch_size=14", "model.vision.hidden_size=64", "model.vision.ffn_hidden_size=128",
    "model.vision.num_layers=2", "model.vision.num_attention_heads=4",
    "model.vision.norm_type=rms_norm", "model.vision.qk_norm=true", "model.vision.qkv_bias=false",
    # llm: GQA 4 heads / 2 groups, odd vocab (300 -> padded 384 at TP1, 512 at TP2)
    "model.llm.vocab_size=300", "model.llm.hidden_size=64", "model.llm.ffn_hidden_size=96",
    "model.llm.num_layers=4", "model.llm.num_attention_heads=4", "model.llm.num_query_groups=2",
    "model.llm.max_position_embeddings=128", "model.llm.rope_theta=10000",
    "model.image_token_id=7", "train.seq_length=48", "train.micro_batch_size=2",
    "model.transformer_impl=local",
]
SEQ, MBS, N_MICRO = 48, 2, 4


def make_batches(cfg, seed: int = 0) -> list[dict]:
    """Deterministic micro-batches: image rows, text-only rows, and one packed row."""
    g = torch.Generator().manual_seed(seed)
    tpt, img_id, vocab = cfg.model.tokens_per_tile, cfg.model.image_token_id, cfg.model.llm.vocab_size
    side = cfg.model.vision.image_size
    batches = []
    for m in range(N_MICRO):
        tokens = torch.randint(10, vocab, (MBS, SEQ), generator=g)
        tiles = torch.zeros(MBS, dtype=torch.long)
        segment_ids = torch.ones(MBS, SEQ, dtype=torch.long)
        position_ids = torch.arange(SEQ).repeat(MBS, 1)
        for b in range(MBS):
            n_tiles = (m + b) % 3  # 0 (text-only), 1 or 2 tiles
            if n_tiles:
                start = 3 + 5 * b
                tokens[b, start : start + n_tiles * tpt] = img_id
                tiles[b] = n_tiles
        if m == N_MICRO - 1:  # pack two samples into row 0: 30 + 18 tokens
            segment_ids[0, 30:] = 2
            position_ids[0, 30:] = torch.arange(SEQ - 30)
        labels = torch.randint(10, vocab, (MBS, SEQ), generator=g)
        loss_mask = (torch.rand(MBS, SEQ, generator=g) > 0.3).float()
        pixel_values = torch.randn(int(tiles.sum()), 3, side, side, generator=g)
        batches.append(dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=position_ids,
                            segment_ids=segment_ids, pixel_values=pixel_values, tiles_per_row=tiles,
                            sample_ids=[[f"m{m}b{b}"] for b in range(MBS)]))
    return batches


def gathered_logits(model, batch, pg, vocab_size: int) -> torch.Tensor:
    from engine.model.output_layer import logits_output
    from engine.train.step import model_inputs

    with torch.no_grad(), logits_output(model):  # also for a model prepared for loss_impl=fused_linear
        local = model(**model_inputs(batch))  # (b, s, V/tp)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(pg.tp))]
    dist.all_gather(parts, local.contiguous(), group=pg.tp)
    return torch.cat(parts, dim=-1)[..., :vocab_size]


def run(args) -> None:
    from engine.config import load_config
    from engine.model.build import build_for_this_stage
    from engine.parallel import full_state as fs
    from engine.parallel.init import initialize
    from engine.parallel.wrap import unwrap, wrap_ddp
    from engine.train.losses import output_weight, prepare_model
    from engine.train.step import forward_backward, nll_loss_factory, summarize_lm

    out = Path(args.out)
    overrides = TINY + [f"parallel.tensor_model_parallel_size={args.tp}",
                        f"parallel.pipeline_model_parallel_size={args.pp}"] + args.override
    cfg = load_config(None, overrides)
    pg = initialize(cfg.parallel, seed=cfg.train.seed)
    rank = dist.get_rank()
    tp_rank = dist.get_rank(pg.tp)
    vocab = cfg.model.llm.vocab_size

    if args.mode == "freeze":
        return run_freeze(args, cfg, pg, out)

    if cfg.parallel.virtual_pipeline_model_parallel_size > 1:
        model = None  # the chunks are built in run_chunks
        full = torch.load(Path(args.init), weights_only=True)
        return run_chunks(args, cfg, pg, full, make_batches(cfg), out)
    model = build_for_this_stage(cfg, pg)
    if args.mode == "reference":
        g = torch.Generator().manual_seed(99)
        with torch.no_grad():  # move every tensor off its constant init so layout errors show
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        full = fs.full_state(model, pg.tp, vocab)
        if rank == 0:
            torch.save(full, out / "init.pt")
    else:
        full = torch.load(Path(args.init), weights_only=True)
        if args.wrong_layout:  # deliberately split SwiGLU's fc1 as if it were one matrix
            fs.is_gated_fc1 = lambda name, model: False
        fs.load_full_state(model, full, pg.tp)

    prepare_model(model, args.loss_impl)
    batches = make_batches(cfg)
    if cfg.parallel.virtual_pipeline_model_parallel_size > 1:
        return run_chunks(args, cfg, pg, full, batches, out)
    ddp = wrap_ddp(model, cfg, pg)
    ddp.zero_grad_buffer()
    loss_factory = nll_loss_factory(pg.tp, vocab, args.loss_impl, output_weight(model, args.loss_impl))
    result = summarize_lm(forward_backward(ddp, batches, pg, loss_factory))
    grads = fs.full_state(unwrap(ddp), pg.tp, vocab, grads=True)
    saved = {"grads": grads}
    if result:
        saved.update(loss=result["loss"], per_token_loss=torch.stack(result["per_token_loss"]))
    if args.pp == 1:
        saved["logits"] = gathered_logits(unwrap(ddp), batches[0], pg, vocab)
    if tp_rank == 0:
        torch.save(saved, out / f"rank{rank}.pt")
    dist.barrier()


def run_chunks(args, cfg, pg, full: dict, batches: list[dict], out: Path) -> None:
    """compare mode with virtual pipeline stages: this rank's chunks, interleaved 1F1B."""
    from engine.model.build import build_model_chunks
    from engine.parallel import full_state as fs
    from engine.parallel.wrap import unwrap, wrap_ddp_chunks
    from engine.train.step import forward_backward, nll_loss_factory, summarize_lm

    vocab = cfg.model.llm.vocab_size
    chunks = build_model_chunks(cfg, pg)
    for chunk in chunks:
        fs.load_full_state(chunk, full, pg.tp)
    ddps = wrap_ddp_chunks(chunks, cfg, pg)
    for d in ddps:
        d.zero_grad_buffer()
    result = summarize_lm(forward_backward(ddps, batches, pg, nll_loss_factory(pg.tp, vocab, args.loss_impl)))
    saved = {"grads": {k: v for d in ddps for k, v in fs.full_state(unwrap(d), pg.tp, vocab, grads=True).items()},
             "layers": [[layer.layer_number for layer in c.llm.decoder.layers] for c in chunks]}
    if result:
        saved.update(loss=result["loss"], per_token_loss=torch.stack(result["per_token_loss"]))
    if dist.get_rank(pg.tp) == 0:
        torch.save(saved, out / f"rank{dist.get_rank()}.pt")
    dist.barrier()


FREEZE_CASES = {
    "adapter_only": dict(vision=True, projector=False, llm=True),
    "llm_adapter": dict(vision=True, projector=False, llm=False),
    "adapter_vit": dict(vision=False, projector=False, llm=True),
}


def run_freeze(args, cfg, pg, out: Path) -> None:
    from engine.model.build import build_for_this_stage
    from engine.parallel.wrap import unwrap, wrap_ddp
    from engine.train.optim import build_optimizer
    from engine.train.step import forward_backward, nll_loss_factory, summarize_lm

    report = {}
    for case, frozen in FREEZE_CASES.items():
        cfg.model.vision.freeze, cfg.model.projector.freeze, cfg.model.llm.freeze = (
            frozen["vision"], frozen["projector"], frozen["llm"])
        ddp = wrap_ddp(build_for_this_stage(cfg, pg), cfg, pg)
        optimizer = build_optimizer(cfg, [ddp])
        before = {n: p.detach().clone() for n, p in unwrap(ddp).named_parameters()}
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(ddp, make_batches(cfg), pg, nll_loss_factory(pg.tp, cfg.model.llm.vocab_size))
        ok, _, _ = optimizer.step()
        assert ok, "optimizer step was skipped"
        report[case] = {n: bool((p.detach() != before[n]).any()) for n, p in unwrap(ddp).named_parameters()}
    torch.save(report, out / f"freeze_rank{dist.get_rank()}.pt")
    dist.barrier()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["reference", "compare", "freeze"], required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--init", default="")
    ap.add_argument("--loss-impl", default="reference")
    ap.add_argument("--wrong-layout", action="store_true")
    ap.add_argument("--override", action="append", default=[])
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    run(args)
    from engine.parallel.init import shutdown

    shutdown()
