"""Native rollout: generation with our megatron VLM and megatron-core's static KV cache.

The exactness reference for the vLLM backend and the fallback without vLLM. Runs at the training TP
(every rank of the TP group calls `generate` with the same requests); PP is not supported.

Batching: prompts are left-padded to the longest, so every row's next token sits in the same column
and one `StaticInferenceContext` (megatron's KV cache, (seq, batch, groups, head_dim) per layer) serves
the batch. Two things megatron's static path would get wrong for padded rows are handled here:
  * RoPE: `GPTModel` indexes RoPE by cache column, which would shift a padded row's positions. We call
    the decoder ourselves with per-row RoPE frequencies (row b, column j -> position j - pad_b), so every
    row sees positions 0..L-1 as in an unpadded forward (and in vLLM / transformers).
  * Masking: padded key columns are masked explicitly in prefill and decode (megatron turns the causal
    mask type off after prefill and relies on the mask tensor we hand in). Megatron's local
    `DotProductAttention` honours the mask; Transformer Engine's attention with `no_mask`/`causal` types
    does not, so padded batches under TE are refused with a message.
Logits stay vocab-parallel through the output layer, are all-gathered over TP, and columns past
`vocab_size` (TP padding) are dropped before sampling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from engine.model.output_layer import logits_output
from engine.parallel.device import compute_device, place_tensor
from engine.rollout.base import (
    Completion, GenerationRequest, GenerationResult, ImageInputs, RolloutEngine, SamplingParams, WeightPush,
    check_stop_reason, iter_named,
)
from engine.rollout.sampling import sample

PAD_ID = 0  # any in-vocabulary id but the image token: padded columns are masked out and never read back


@dataclass
class _Row:
    request: int  # index into the request list
    prompt: list[int]
    tiles: torch.Tensor | None  # (n_tiles, 3, H, W) or None


def _tp(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def gather_vocab_logits(local: torch.Tensor, tp_group, vocab_size: int) -> torch.Tensor:
    """(B, V_padded/tp) on each TP rank -> (B, vocab_size) on every rank; the TP padding columns are dropped."""
    _, size = _tp(tp_group)
    if size > 1:
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous(), group=tp_group)
        local = torch.cat(parts, dim=-1)  # (B, V_padded)
    return local[:, :vocab_size]


class NativeRolloutEngine(RolloutEngine):
    def __init__(self, model, tp_group, vocab_size: int, max_model_len: int, *, tokenizer: Any = None,
                 max_batch_size: int = 64, image_processor: Callable[[list], torch.Tensor] | None = None,
                 seed: int = 0):
        """model: our VLM (unwrapped, one PP stage that is both first and last). vocab_size: the real
        vocabulary (cfg.model.llm.vocab_size). image_processor: PIL images -> (n_tiles, 3, H, W) tiles,
        needed only for requests that carry PIL images."""
        if not (model.pre_process and model.post_process):
            raise NotImplementedError(
                "the native rollout engine needs the whole LLM on one pipeline stage; "
                "set parallel.pipeline_model_parallel_size=1 or use rollout.backend=vllm"
            )
        if model.llm.config.sequence_parallel:
            raise NotImplementedError("native rollout with parallel.sequence_parallel=true is not supported; turn it off")
        self.model = model
        self.tp_group = tp_group
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.image_processor = image_processor
        self.generator = torch.Generator(device=compute_device()).manual_seed(seed)  # draws happen where the logits are
        self.stats: dict[str, float] = {}

    # ------------------------------------------------------------------------------------ interface
    def generate(self, requests: list[GenerationRequest], params: SamplingParams) -> list[GenerationResult]:
        rows = [_Row(i, list(r.prompt_token_ids), self._tiles(r)) for i, r in enumerate(requests) for _ in range(params.n)]
        for r in rows:
            if len(r.prompt) >= self.max_model_len:
                raise ValueError(
                    f"request {requests[r.request].request_id or r.request}: prompt has {len(r.prompt)} tokens, "
                    f"max_model_len is {self.max_model_len}; shorten the prompt or raise rollout.max_model_len"
                )
        generator = (torch.Generator(device=compute_device()).manual_seed(params.seed) if params.seed is not None
                     else self.generator)
        outputs: list[Completion] = []
        was_training = self.model.training
        self.model.eval()
        t0, n_tokens = time.perf_counter(), 0
        try:
            with torch.no_grad(), logits_output(self.model):  # also when training fuses the output layer into its loss
                for start in range(0, len(rows), self.max_batch_size):
                    batch = rows[start : start + self.max_batch_size]
                    done = self._generate_batch(batch, params, generator)
                    outputs.extend(done)
                    n_tokens += sum(len(c.token_ids) for c in done)
        finally:
            self.model.train(was_training)
        elapsed = time.perf_counter() - t0
        self.stats = {"generate_s": elapsed, "generated_tokens": n_tokens, "tokens_per_s": n_tokens / max(elapsed, 1e-9)}
        results = [GenerationResult(r.request_id, list(r.prompt_token_ids), []) for r in requests]
        for row, completion in zip(rows, outputs):
            completion.text = self.decode(completion.token_ids)
            results[row.request].completions.append(completion)
        return results

    def update_weights(self, weights) -> WeightPush:
        """The native engine generates with the training model itself: passing that model is a no-op;
        an iterator of our *full* (TP=1) named tensors is loaded into the shards."""
        if isinstance(weights, torch.nn.Module):
            if weights is not self.model:
                raise ValueError("NativeRolloutEngine generates with the model it was built with; pass that model")
            return WeightPush(seconds=0.0)
        from engine.parallel.full_state import load_full_state

        t0 = time.perf_counter()
        full = dict(iter_named(weights))
        used = load_full_state(self.model, full, self.tp_group, strict=False)
        return WeightPush(seconds=time.perf_counter() - t0, tensors=len(used),
                          bytes=sum(full[k].numel() * full[k].element_size() for k in set(used) if k in full))

    def sleep(self) -> None:  # nothing of its own to free: the model is the training model
        pass

    def wake(self) -> None:
        pass

    # ------------------------------------------------------------------------------------ internals
    def _tiles(self, request: GenerationRequest) -> torch.Tensor | None:
        images = request.images
        if images is None or (isinstance(images, (list, tuple)) and not images):
            return None
        if isinstance(images, ImageInputs):
            images = images.pixel_tiles()  # our pipeline's tiles: the ones the trainer uses
        if isinstance(images, torch.Tensor):
            if images.dim() != 4:
                raise ValueError(f"request {request.request_id}: pixel tiles must be (n_tiles, 3, H, W), got {tuple(images.shape)}")
            return images
        if self.image_processor is None:
            raise ValueError(
                f"request {request.request_id}: PIL images need an image_processor (PIL list -> tiles) on the "
                "native engine; pass one or give pixel tiles"
            )
        return self.image_processor(list(images))

    def _rope(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (B, S) -> RoPE freqs (S, B, 1, d), the layout megatron's attention broadcasts."""
        rope = self.model.llm.rotary_pos_emb
        if rope.rotary_interleaved or rope.seq_len_interpolation_factor is not None:
            raise NotImplementedError("native rollout supports plain (non-interleaved, unscaled) RoPE only")
        inv_freq = rope.inv_freq.to(positions.device)
        freqs = positions.to(inv_freq.dtype)[..., None] * inv_freq  # (B, S, d/2), as torch.outer does per row
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, d)
        return emb.transpose(0, 1)[:, :, None, :].contiguous()  # (S, B, 1, d)

    def _logits(self, tokens, positions, mask, rope, ctx, tiles, tiles_per_row) -> torch.Tensor:
        """One forward through the cache: tokens (B, s) -> full-vocab fp32 logits of the last column (B, V)."""
        from engine.model.vlm import merge_image_embeddings

        llm = self.model.llm
        emb = llm.embedding(input_ids=tokens, position_ids=positions)  # (s, B, h)
        if tiles is not None:
            image_emb = self.model.image_embeddings(tiles)  # (n_tiles, tokens_per_tile, h)
            emb = merge_image_embeddings(emb, tokens, image_emb, self.model.image_token_id,
                                         self.model.tokens_per_tile, tiles_per_row)
        hidden = llm.decoder(hidden_states=emb, attention_mask=mask, inference_context=ctx, rotary_pos_emb=rope)
        weight = llm.shared_embedding_or_output_weight() if llm.share_embeddings_and_output_weights else None
        local, _ = llm.output_layer(hidden[-1:], weight=weight)  # (1, B, V_padded / tp)
        return self._gather_vocab(local[0].float())

    def _gather_vocab(self, local: torch.Tensor) -> torch.Tensor:
        return gather_vocab_logits(local, self.tp_group, self.vocab_size)

    def _same_on_tp(self, tokens: torch.Tensor) -> torch.Tensor:
        """TP ranks must feed the same token: take TP rank 0's draw (sampling RNG may differ per rank)."""
        _, size = _tp(self.tp_group)
        if size > 1:
            dist.broadcast(tokens, src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
        return tokens

    def _check_attention(self, padded: bool) -> None:
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        attn = self.model.llm.decoder.layers[0].self_attention.core_attention
        if padded and not isinstance(attn, DotProductAttention):
            raise NotImplementedError(
                f"native rollout of prompts with different lengths needs megatron's local attention (it honours the "
                f"padding mask); this model uses {type(attn).__name__}. Build with model.transformer_impl=local, "
                "send equal-length prompts, or use rollout.backend=vllm"
            )

    def _generate_batch(self, rows: list[_Row], params: SamplingParams, generator) -> list[Completion]:
        from megatron.core.inference.contexts import StaticInferenceContext

        B = len(rows)
        lengths = torch.tensor([len(r.prompt) for r in rows])
        P = int(lengths.max())
        pad = P - lengths  # (B,) left padding per row
        budget = min(params.max_tokens, self.max_model_len - int(lengths.min()))
        S = P + budget  # cache columns
        self._check_attention(bool((pad > 0).any()))

        pad_id = PAD_ID if self.model.image_token_id != PAD_ID else PAD_ID + 1
        tokens = torch.full((B, P), pad_id, dtype=torch.long)
        for b, r in enumerate(rows):
            tokens[b, P - len(r.prompt) :] = torch.tensor(r.prompt)
        cols = torch.arange(S)
        positions = (cols[None, :] - pad[:, None]).clamp(min=0)  # (B, S)
        key_valid = cols[None, :] >= pad[:, None]  # (B, S): False on left padding
        causal = torch.ones(P, P, dtype=torch.bool).tril()
        prefill_mask = ~(causal[None] & key_valid[:, None, :P])[:, None]  # (B, 1, P, P), True = masked

        tiles = [r.tiles for r in rows if r.tiles is not None]
        pixel = torch.cat(tiles) if tiles else None
        tiles_per_row = torch.tensor([0 if r.tiles is None else r.tiles.shape[0] for r in rows]) if tiles else None

        seen = torch.zeros(B, self.vocab_size, dtype=torch.bool)  # ids in prompt + output, for the penalty
        for b, r in enumerate(rows):
            ids = torch.tensor([t for t in r.prompt if t < self.vocab_size], dtype=torch.long)
            seen[b, ids] = True
        # everything the model and the sampler read lives where the model computes (the GPU on CUDA)
        tokens, positions, key_valid, prefill_mask, seen = (
            place_tensor(t) for t in (tokens, positions, key_valid, prefill_mask, seen))
        pixel = place_tensor(pixel) if pixel is not None else None
        tiles_per_row = place_tensor(tiles_per_row) if tiles_per_row is not None else None
        rope = self._rope(positions)

        ctx = StaticInferenceContext(max_batch_size=B, max_sequence_length=S)
        logits = self._logits(tokens, positions[:, :P], prefill_mask, rope, ctx, pixel, tiles_per_row)
        ctx.sequence_len_offset = P
        ctx.enable_decode_mode()

        out_ids: list[list[int]] = [[] for _ in range(B)]
        out_lp: list[list[float]] = [[] for _ in range(B)]
        finish: list[str | None] = [None] * B
        for step in range(budget):
            logprobs = torch.log_softmax(logits, dim=-1)  # raw distribution (see engine.rollout.base)
            nxt = self._same_on_tp(sample(logits, seen, params, generator))  # (B,)
            picked = logprobs.gather(1, nxt[:, None]).squeeze(1).tolist()  # one device->host copy per step
            nxt_ids = nxt.tolist()
            for b in range(B):
                if finish[b] is not None:
                    continue
                tok = nxt_ids[b]
                out_ids[b].append(tok)
                out_lp[b].append(picked[b])
                seen[b, tok] = True
                finish[b] = check_stop_reason(tok, len(out_ids[b]), params)
                if finish[b] is None and int(lengths[b]) + len(out_ids[b]) >= self.max_model_len:
                    finish[b] = "length"
            if all(f is not None for f in finish) or step == budget - 1:
                break
            col = P + step  # the cache column the new token goes to
            feed = place_tensor(torch.tensor([out_ids[b][-1] if finish[b] is None else pad_id for b in range(B)])[:, None])
            mask = ~key_valid[:, None, None, : col + 1]  # (B, 1, 1, col + 1)
            logits = self._logits(feed, positions[:, col : col + 1], mask, rope, ctx, None, None)
            ctx.sequence_len_offset = col + 1
        return [Completion(out_ids[b], out_lp[b], finish[b] or "length") for b in range(B)]


def full_forward_greedy(model, tp_group, vocab_size: int, prompt: list[int], max_tokens: int,
                        tiles: torch.Tensor | None = None) -> tuple[list[int], list[float]]:
    """The no-cache reference: re-run the full forward over prompt + generated tokens at every step and
    take the argmax of the last position. Returns (token ids, raw log-probs)."""
    ids, lps = list(prompt), []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), logits_output(model):
            for _ in range(max_tokens):
                tokens = place_tensor(torch.tensor([ids]))
                positions = place_tensor(torch.arange(len(ids))[None])
                tpr = place_tensor(torch.tensor([tiles.shape[0]])) if tiles is not None else None
                pixels = place_tensor(tiles) if tiles is not None else None
                local = model(tokens, positions, None, pixel_values=pixels, tiles_per_row=tpr)  # (1, s, V/tp)
                logits = gather_vocab_logits(local[0, -1:].float(), tp_group, vocab_size)  # (1, V)
                tok = int(logits.argmax(-1))
                lps.append(float(torch.log_softmax(logits, -1)[0, tok]))
                ids.append(tok)
    finally:
        model.train(was_training)
    return ids[len(prompt):], lps
