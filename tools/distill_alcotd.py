"""AL-CoTD (R1V §2.3): distil adaptive-length reasoning traces into an SFT file.

    python tools/distill_alcotd.py --config recipes/tiny_cpu_grpo.yaml --ckpt runs/demo_sft \
        --data scored_rl.jsonl --out distilled/sft.jsonl --k 4 --alpha 1.0 rollout.backend=native
    torchrun --nproc_per_node=2 tools/distill_alcotd.py ...      # each DP rank generates its share

Input: RL-prompt JSONL (id, image, prompt, answer, type) whose rows also carry the scores S_v, S_t, S_I
(fields --score-fields, default s_v s_t s_i). Over the file the scores are min-max scaled and each
query gets P = min(2, exp(α(1 − (Ŝ_v + βŜ_t + γŜ_I)/(1+β+γ)))) as its repetition penalty (α, β, γ
default to the recipe's algorithm.decoding.alcotd_*). k traces per query are generated through the
rollout engine (rollout.backend native or vllm) in think mode and checked by the rule reward.
Output: <out> SFT `conversations` rows (correct traces, with `alcotd` metadata: penalty, scores,
response length), <out stem>.revise.jsonl (queries with no correct trace, RL format + their traces,
for revision: R1V has GPT-4o revise them) and <out stem>.summary.json (counts, mean length per
penalty bucket). Run it again before each SFT iteration with the latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="model + rollout recipe (e.g. recipes/tiny_cpu_grpo.yaml)")
    ap.add_argument("--ckpt", default="", help="checkpoint (a step dir, or a run dir with checkpoints/latest)")
    ap.add_argument("--data", required=True, help="RL-format JSONL with per-query scores")
    ap.add_argument("--out", required=True, help="SFT-format JSONL to write")
    ap.add_argument("--revise-out", default="", help="queries without a correct trace (default <out>.revise.jsonl)")
    ap.add_argument("--summary", default="", help="JSON summary (default <out>.summary.json)")
    ap.add_argument("--score-fields", nargs=3, default=["s_v", "s_t", "s_i"], metavar=("S_V", "S_T", "S_I"))
    ap.add_argument("--alpha", type=float, default=None, help="α (default algorithm.decoding.alcotd_alpha)")
    ap.add_argument("--beta", type=float, default=None, help="β (default algorithm.decoding.alcotd_beta)")
    ap.add_argument("--gamma", type=float, default=None, help="γ (default algorithm.decoding.alcotd_gamma)")
    ap.add_argument("--max-penalty", type=float, default=2.0, help="cap on P (R1V: 2)")
    ap.add_argument("--no-scale", action="store_true", help="scores are already in [0, 1]: no min-max scaling")
    ap.add_argument("--penalty-step", type=float, default=0.01,
                    help="P is rounded to this step to batch queries per generate call (0: exact)")
    ap.add_argument("--k", type=int, default=4, help="traces generated per query")
    ap.add_argument("--per-query", type=int, default=1, help="correct (distinct) traces kept per query")
    ap.add_argument("--temperature", type=float, default=0.6,
                    help="0 = greedy; 0.6 is DeepSeek-R1's recommended sampling temperature")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    ap.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                    help="a row with a missing score / bad image / too long: raise (file:line) or skip and count")
    ap.add_argument("--limit", type=int, default=None, help="only the first N rows")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--buckets", type=float, nargs="+", default=[1.0, 1.25, 1.5, 1.75],
                    help="lower edges of the summary's penalty buckets")
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = ap.parse_args(argv)

    from engine.config import load_config
    from engine.distillation import DistillOptions, distill, load_queries
    from engine.rl.alcotd import AlcotdParams

    cfg = load_config(args.config, list(args.overrides) + ["data.format=rl", "data.packing=false",
                                                           "data.thinking=think", f"data.train_path={args.data}",
                                                           "data.max_samples=0"])  # the whole file (--limit cuts)
    d = cfg.algorithm.decoding
    alpha = d.alcotd_alpha if args.alpha is None else args.alpha
    beta = d.alcotd_beta if args.beta is None else args.beta
    gamma = d.alcotd_gamma if args.gamma is None else args.gamma
    try:
        params = AlcotdParams(alpha, beta, gamma, args.max_penalty, scale=not args.no_scale)
        opts = DistillOptions(
            data=args.data, out=args.out, params=params, revise_out=args.revise_out, summary_out=args.summary,
            score_fields=tuple(args.score_fields), k=args.k, per_query=args.per_query,
            temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
            penalty_step=args.penalty_step, batch_size=args.batch_size, on_error=args.on_error, seed=args.seed,
            limit=args.limit, bucket_edges=tuple(args.buckets))
    except ValueError as e:
        ap.error(str(e))

    from engine.data.errors import DataError

    try:
        loaded = load_queries(cfg, opts)  # bad rows fail here, before the model is built
    except DataError as e:
        print(f"error: {e}\n(--on-error skip skips such rows and counts them)", file=sys.stderr)
        return 2

    from engine.model.build import build_for_this_stage
    from engine.parallel.init import initialize, shutdown
    from engine.train import checkpointing as ckpt

    pg = initialize(cfg.parallel, seed=cfg.train.seed)
    model = build_for_this_stage(cfg, pg).eval()
    if args.ckpt:
        ckpt.load_model_only(ckpt.resolve_checkpoint(args.ckpt), model)
    summary = distill(cfg, model, pg, opts, extra={"checkpoint": args.ckpt}, loaded=loaded)
    if summary is not None:
        print(json.dumps(summary))
    shutdown()  # distill() closed the rollout engine it built
    return 0


if __name__ == "__main__":
    sys.exit(main())
