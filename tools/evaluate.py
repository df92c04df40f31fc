"""Evaluate a checkpoint on an RL-format JSONL benchmark: pass@1 over k samples per decoding mode.

    python tools/evaluate.py --config recipes/tiny_cpu_grpo.yaml --ckpt runs/tiny_cpu_grpo \
        --data data/generated/rl.jsonl --modes think nothink nowait budget --budget 32 --k 4 --json
    torchrun --nproc_per_node=2 tools/evaluate.py ...        # each DP rank evaluates its shard

Accuracy is the rule check (final \\boxed{}/Answer: extraction + math-verify); the decoding modes are
R1V3's: think, nothink, nowait (ban the recipe's algorithm.decoding.banned_words by logit bias), budget
(force '</think>' after --budget thinking tokens, then the recipe's answer prefix). --max-tokens bounds the
whole response, thinking included.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--ckpt", default="", help="checkpoint (a step dir, or a run dir with checkpoints/latest)")
    ap.add_argument("--data", default="", help="RL-format JSONL (default: the recipe's data.train_path)")
    ap.add_argument("--modes", nargs="+", default=["think"], choices=["think", "nothink", "nowait", "budget"])
    ap.add_argument("--k", type=int, default=5, help="samples per prompt (pass@1 is averaged over them; R1V: 5)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--budget", type=int, default=None, help="thinking budget in tokens (mode budget)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many prompts per rank")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)

    from engine.config import load_config

    # the whole file: a recipe's data.max_samples (a training prompt pool) does not cut a benchmark; --limit does
    overrides = list(args.overrides) + ["data.format=rl", "data.packing=false", "data.max_samples=0"]
    if args.data:
        overrides.append(f"data.train_path={args.data}")
    cfg = load_config(args.config, overrides)
    if "budget" in args.modes and args.budget is None:
        ap.error("--modes budget needs --budget N")

    from engine.evaluation import evaluate
    from engine.model.build import build_for_this_stage
    from engine.parallel.init import initialize, shutdown
    from engine.train import checkpointing as ckpt

    pg = initialize(cfg.parallel, seed=cfg.train.seed)
    model = build_for_this_stage(cfg, pg).eval()
    if args.ckpt:
        ckpt.load_model_only(ckpt.resolve_checkpoint(args.ckpt), model)
    results = evaluate(cfg, model, pg, args.modes, args.k, args.temperature, args.max_tokens, args.budget, args.limit)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        if args.json:
            print(json.dumps({"checkpoint": args.ckpt, "data": cfg.data.train_path, "results": results}))
        else:
            print(f"{'mode':8s} {'pass@1':>8s} {'mean_len':>9s} {'samples':>8s}")
            for mode, r in results.items():
                print(f"{mode:8s} {r['pass@1']:8.3f} {r['mean_length']:9.1f} {r['samples']:8d}")
    shutdown()  # evaluate() closed the rollout engine it built
    return 0


if __name__ == "__main__":
    sys.exit(main())
