"""Rollout throughput and weight-push time, native vs vLLM, on a tiny text model (CPU or GPU).

    .venv/bin/python -m engine.rollout.bench --out runs/bench_rollout.json [--hidden 128 --layers 2]

Single process. Each measurement is the best of `--repeats` after one warm-up call. Rows are written as
JSON: {"backend", "prompts", "max_tokens", "tokens_per_s", ...} plus the push rows.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def _build(hidden: int, layers: int, vocab: int):
    from engine.config import load_config
    from engine.model.build import build_vlm
    from engine.parallel.init import initialize

    heads = hidden // 32  # vLLM-CPU attention needs head_dim >= 32
    cfg = load_config(None, [
        f"model.llm.vocab_size={vocab}", f"model.llm.hidden_size={hidden}", f"model.llm.ffn_hidden_size={3 * hidden // 2}",
        f"model.llm.num_layers={layers}", f"model.llm.num_attention_heads={heads}",
        f"model.llm.num_query_groups={max(1, heads // 2)}", "model.llm.max_position_embeddings=512",
        "model.transformer_impl=local", "model.text_only=true", "model.image_token_id=7",
        "model.vision.image_size=56", "data.tile_size=56", "data.max_tiles=1", "model.vision.patch_size=14",
        "train.seq_length=256",
    ])
    pg = initialize(cfg.parallel, seed=0)
    return cfg, pg, build_vlm(cfg, pg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", "29611")

    import torch

    from engine.rollout.base import GenerationRequest, SamplingParams
    from engine.rollout.native import NativeRolloutEngine
    from engine.rollout.vllm_engine import VLLMRolloutEngine

    cfg, pg, model = _build(args.hidden, args.layers, args.vocab)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        vllm = VLLMRolloutEngine.from_model(model, cfg, pg, Path(tmp) / "hf", kv_cache_bytes=64 << 20,
                                            max_model_len=256, max_num_seqs=64)
        native = NativeRolloutEngine(model, pg.tp, cfg.model.llm.vocab_size, 256, max_batch_size=64)
        g = torch.Generator().manual_seed(0)
        # ignore_eos-style: no stop ids, so every sample runs to max_tokens
        params = SamplingParams(temperature=1.0, max_tokens=args.max_tokens, seed=0)
        for n in args.batches:
            reqs = [GenerationRequest(torch.randint(10, args.vocab, (24,), generator=g).tolist()) for _ in range(n)]
            for name, engine in (("native", native), ("vllm", vllm)):
                engine.generate(reqs, params)  # warm-up
                speeds = []
                for _ in range(args.repeats):
                    engine.generate(reqs, params)
                    speeds.append(engine.stats["tokens_per_s"])
                best = max(speeds)
                rows.append({"backend": name, "prompts": n, "prompt_tokens": 24, "max_tokens": args.max_tokens,
                             "tokens_per_s": round(best, 1)})
        pushes = [vllm.update_weights(model) for _ in range(args.repeats + 1)][1:]
        best = min(pushes, key=lambda p: p.seconds)
        rows.append({"backend": "vllm", "weight_push_s": round(best.seconds, 4), "push_bytes": best.bytes,
                     "buckets": best.buckets})
    meta = {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "torch_threads": torch.get_num_threads(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(json.dumps(rows, indent=1))
    os._exit(0)  # vLLM's in-process engine tears down the default process group on its own schedule


if __name__ == "__main__":
    main()
