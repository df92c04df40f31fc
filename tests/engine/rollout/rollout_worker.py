"""torchrun worker for the rollout tests (2 processes, gloo, training TP=2).

Modes:
  native   load the full state the test saved, generate greedy through the KV cache (batched, padded,
           an image row) and by full forward at TP=2; write both.
  vllm     text model at --tp/--pp: in-process vLLM (external_launcher; --rollout-tp 1: one engine per rank,
           2: one engine over both ranks) built from our shards; greedy before a push, perturb our weights,
           push them (bucketed, streamed from the TP/PP shards), greedy again. References: our native
           engine (PP=1) or transformers on a fresh HF export of our model (PP=2). Writes tokens + timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def native(args) -> None:
    from engine.parallel.full_state import load_full_state
    from engine.rollout.base import SamplingParams
    from engine.rollout.native import NativeRolloutEngine, full_forward_greedy
    from tests.engine.rollout.test_rollout_native import MAX_LEN, prompts_and_tiles
    from tests.engine.rollout.tiny import VLM, build

    cfg, pg, model = build(VLM, tp=2)
    load_full_state(model, torch.load(args.init, weights_only=True), pg.tp)
    eng = NativeRolloutEngine(model, pg.tp, cfg.model.llm.vocab_size, MAX_LEN)
    reqs = prompts_and_tiles()
    cached = [r.completions[0].token_ids for r in eng.generate(reqs, SamplingParams(temperature=0, max_tokens=10))]
    full = [full_forward_greedy(model, pg.tp, cfg.model.llm.vocab_size, r.prompt_token_ids, 10,
                                r.images if isinstance(r.images, torch.Tensor) else None)[0] for r in reqs]
    # hot sampling: were the 212 padding columns (zero output weights -> logit 0) not masked, about 40%
    # of these draws would land on ids >= 300
    hot = eng.generate(reqs, SamplingParams(temperature=5.0, max_tokens=10, n=4, seed=2))
    sampled = [c.token_ids for r in hot for c in r.completions]
    Path(args.out, f"native_rank{dist.get_rank()}.json").write_text(
        json.dumps({"cached": cached, "full_forward": full, "hot_samples": sampled}))


def vllm(args) -> None:
    from engine.rollout.base import GenerationRequest, SamplingParams
    from engine.rollout.native import NativeRolloutEngine
    from engine.rollout.vllm_engine import VLLMRolloutEngine, write_hf_model_dir
    from tests.engine.rollout.tiny import TEXT, build, perturb

    cfg, pg, model = build(TEXT, tp=args.tp, pp=args.pp)
    rank = dist.get_rank()
    out_dir = Path(args.out)
    engine = VLLMRolloutEngine.from_model(
        model, cfg, pg, out_dir / "hf", kv_cache_bytes=32 << 20, max_model_len=128, max_num_seqs=8,
        tensor_parallel_size=args.rollout_tp, dtype="float32",  # rollout.dtype defaults to bf16 (GPU)
        bucket_bytes=300_000,  # ~0.3 MB: the 1.3 MB tiny model goes over in several buckets
    )
    reqs = [GenerationRequest(p) for p in ([5, 9, 11, 40, 41], [12, 13], [3, 20, 21, 22, 23, 24, 25])]
    greedy = SamplingParams(temperature=0, max_tokens=12)

    def tokens(e):
        return [r.completions[0].token_ids for r in e.generate(reqs, greedy)]

    def reference(tag: str):
        """Our model's greedy output: the native engine (PP=1), else transformers on a fresh HF export."""
        if args.pp == 1:
            native_engine = NativeRolloutEngine(model, pg.tp, cfg.model.llm.vocab_size, 128)
            return tokens(native_engine), native_engine.stats["tokens_per_s"]
        from transformers import Qwen2ForCausalLM

        hf_dir = write_hf_model_dir(model, cfg.model, "qwen2", out_dir / f"ref_{tag}", pg.tp, pg.pp)
        hf = Qwen2ForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        return [hf.generate(torch.tensor([r.prompt_token_ids]), attention_mask=torch.ones(1, len(r.prompt_token_ids),
                dtype=torch.long), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
                )[0, len(r.prompt_token_ids):].tolist() for r in reqs], None

    out = {"init_s": engine.init_s, "before": tokens(engine)}
    out["reference_before"], _ = reference("before")
    engine.sleep()  # train here; on CPU sleep/wake are no-ops, on GPU they free weights + KV cache
    perturb(model, seed=100, scale=0.2)  # same seed on both ranks: replicated tensors (norms) stay identical
    engine.wake()
    pushes = []
    for _ in range(3):  # timing: the first push includes vLLM's one-off reload set-up
        pushes.append(dataclasses.asdict(engine.update_weights(model)))
    out["after"] = tokens(engine)
    out["vllm_tokens_per_s"] = engine.stats["tokens_per_s"]
    out["reference_after"], out["native_tokens_per_s"] = reference("after")
    out["pushes"] = pushes
    Path(args.out, f"vllm_rank{rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["native", "vllm"], required=True)
    ap.add_argument("--init", default="")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--rollout-tp", type=int, default=1)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    {"native": native, "vllm": vllm}[args.mode](args)
    dist.barrier()
    if args.mode == "native":
        dist.destroy_process_group()
    else:  # vLLM's in-process engine owns the default group's teardown; exit without touching it
        os._exit(0)
