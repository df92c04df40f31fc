"""Time full training steps of a reduced 38B-shaped LLM on one device and report step time and MFU as JSON.

    python tools/bench_train_step.py --out step.json                 # GPU: 2 Qwen2.5-32B layers, 16k tokens, bf16
    python tools/bench_train_step.py --dry-run --out step.json       # CPU: the same path at tiny shapes, fp32

The LLM is Qwen2.5-32B's layer (hidden 5120, SwiGLU 27648, 40 query / 8 key-value heads, vocab 152064) cut to
--layers layers, built by the engine (local spec: SDPAttention; Transformer Engine when --impl allows and it
imports), wrapped in megatron DDP with the distributed optimizer, placed on the device by engine.parallel.device.
One step = one micro-batch of --seq tokens packed from --samples equal samples (THD cu_seqlens), forward +
backward + Adam. Model FLOPs come from engine.train.flops (the trainer's MFU formula: real tokens, per-sample
attention); MFU is against the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

import torch  # noqa: E402

import engine  # noqa: E402,F401  (settles Triton's mode first)

FULL = dict(hidden=5120, ffn=27648, heads=40, groups=8, vocab=152064)  # Qwen2.5-32B / Skywork-R1V-38B LLM
TINY = dict(hidden=64, ffn=160, heads=4, groups=2, vocab=1000)


def _config(shape: dict, layers: int, seq: int, dtype: str, impl: str, loss_impl: str):
    from engine.config import load_config

    return load_config(None, [
        f"model.llm.hidden_size={shape['hidden']}", f"model.llm.ffn_hidden_size={shape['ffn']}",
        f"model.llm.num_attention_heads={shape['heads']}", f"model.llm.num_query_groups={shape['groups']}",
        f"model.llm.vocab_size={shape['vocab']}", f"model.llm.num_layers={layers}",
        f"model.llm.max_position_embeddings={max(seq, 128)}", "model.text_only=true", "model.image_token_id=7",
        f"model.params_dtype={dtype}", f"model.transformer_impl={impl}", f"train.seq_length={seq}",
        f"train.loss_impl={loss_impl}", "train.micro_batch_size=1", "train.global_batch_size=1",
        "model.vision.image_size=56", "data.tile_size=56", "data.max_tiles=1",
    ])


def _batch(seq: int, samples: int, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    length = seq // samples
    segment = torch.arange(seq) // length + 1  # samples 1..k, equal lengths
    segment[samples * length:] = 0  # the remainder is padding
    position = torch.arange(seq) - (segment - 1).clamp(min=0) * length
    return {
        "tokens": torch.randint(10, vocab, (1, seq), generator=g),
        "labels": torch.randint(10, vocab, (1, seq), generator=g),
        "loss_mask": (segment > 0).float()[None],
        "position_ids": (position * (segment > 0))[None],
        "segment_ids": segment[None],
        "pixel_values": torch.zeros(0, 3, 56, 56), "tiles_per_row": torch.zeros(1, dtype=torch.long),
        "sample_ids": [[f"s{k}" for k in range(samples)]],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON report")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes in fp32 (CPU CI): the same code path")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, help="tokens per micro-batch (default 16384; dry run 256)")
    ap.add_argument("--samples", type=int, default=4, help="equal samples packed into the micro-batch")
    ap.add_argument("--steps", type=int, help="timed steps (default 5; dry run 2)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    ap.add_argument("--impl", default="local", choices=["local", "transformer_engine", "auto"])
    ap.add_argument("--loss-impl", default="fused", choices=["fused", "reference"])
    args = ap.parse_args(argv)
    dry = args.dry_run
    seq = args.seq or (256 if dry else 16384)
    steps = args.steps or (2 if dry else 5)
    dtype = "float32" if dry else "bfloat16"
    shape = TINY if dry else FULL

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a port nothing listens on now (a fixed one collides with other jobs)
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    from engine.model.build import build_for_this_stage
    from engine.parallel.device import compute_device
    from engine.parallel.init import initialize, shutdown
    from engine.parallel.wrap import wrap_ddp
    from engine.train.flops import device_peak_flops, step_flops, token_stats
    from engine.train.optim import build_optimizer
    from engine.train.step import forward_backward, nll_loss_factory, summarize_lm

    cfg = _config(shape, args.layers, seq, dtype, args.impl, args.loss_impl)
    pg = initialize(cfg.parallel, seed=1234)
    cuda = torch.cuda.is_available()
    model = build_for_this_stage(cfg, pg)
    ddp = wrap_ddp(model, cfg, pg)
    optimizer = build_optimizer(cfg, [ddp])
    batch = _batch(seq, args.samples, shape["vocab"])
    loss_factory = nll_loss_factory(pg.tp, shape["vocab"], cfg.train.loss_impl)

    def step() -> float:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        report = summarize_lm(forward_backward(ddp, [batch], pg, loss_factory))
        optimizer.step()
        return report["loss"]

    times, losses = [], []
    for k in range(args.warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses.append(step())  # reading the loss synchronises with the device
        if cuda:
            torch.cuda.synchronize()
        if k >= args.warmup:
            times.append(time.perf_counter() - t0)
    tokens, squares = token_stats([batch])
    flops = step_flops(cfg.model, tokens, squares, 0)
    median = statistics.median(times)
    peak = device_peak_flops()
    params = sum(p.numel() for p in model.parameters())
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "dry_run": dry, "dtype": dtype,
        "transformer_impl": cfg.model.transformer_impl, "attention": type(
            model.llm.decoder.layers[0].self_attention.core_attention).__name__,
        "shape": {**shape, "layers": args.layers, "seq": seq, "samples": args.samples, "params": params},
        "placed_on": str(next(model.parameters()).device), "compute_device": str(compute_device()),
        "step_time_s": median, "step_times_s": times, "losses": losses,
        "tokens_per_s": tokens / median, "model_tflops_per_step": flops / 1e12,
        "tflops_per_s": flops / median / 1e12, "peak_bf16_tflops": peak / 1e12 if peak else None,
        "mfu": flops / median / peak if peak else None,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps({k: report[k] for k in ("device", "step_time_s", "tflops_per_s", "mfu", "max_memory_gib")}))
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
