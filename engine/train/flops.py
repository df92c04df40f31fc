"""Model FLOPs per training step (ViT + connector + LLM), for the MFU estimate.

Per token and linear layer of N weights: forward 2N, backward 2N for activation gradients (needed when
anything upstream trains) + 2N for weight gradients (when the layer itself trains). Only real tokens count
(padding is work the GPU does but not model FLOPs). Causal attention of a sample of L tokens costs
2 * L^2 * h per layer forward (scores q.k and values p.v, 2*L*L*h each, halved by the causal mask), so
packed rows count sum(L_i^2) over their samples, not seq_length^2.
"""

from __future__ import annotations

import torch

# Dense bf16 tensor-core peak (no sparsity), from NVIDIA's datasheets.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def _factor(trainable: bool, upstream_trainable: bool) -> int:
    return 2 + (2 if (trainable or upstream_trainable) else 0) + (2 if trainable else 0)


def sample_lengths(segment_ids: torch.Tensor) -> torch.Tensor:
    """(b, s) segment ids (samples 1..k per row, padding 0) -> lengths of every sample (int64 [n])."""
    seg = segment_ids.reshape(segment_ids.shape[0], -1).to(torch.int64)
    k = int(seg.max()) + 1 if seg.numel() else 1
    counts = torch.zeros(seg.shape[0], k, dtype=torch.int64)
    counts.scatter_add_(1, seg.cpu(), torch.ones_like(seg.cpu()))  # (b, k): tokens of each segment id per row
    counts = counts[:, 1:]  # id 0 is padding
    return counts[counts > 0]


def token_stats(microbatches: list[dict]) -> tuple[int, int]:
    """(real tokens, sum of squared sample lengths) of micro-batches, from their segment ids (rows without
    segment ids count as one sample of full length)."""
    tokens = squares = 0
    for mb in microbatches:
        seg = mb.get("segment_ids")
        if seg is None:
            b, s = mb["tokens"].shape
            tokens, squares = tokens + b * s, squares + b * s * s
            continue
        lengths = sample_lengths(seg)
        tokens += int(lengths.sum())
        squares += int((lengths * lengths).sum())
    return tokens, squares


def llm_linear_flops_per_token(llm, trainable: bool, upstream_trainable: bool) -> float:
    h, f, L = llm.hidden_size, llm.ffn_hidden_size, llm.num_layers
    kv = h // llm.num_attention_heads * llm.num_query_groups
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * f  # qkv, proj, SwiGLU fc1 (2f) + fc2
    return _factor(trainable, upstream_trainable) * (L * per_layer + h * llm.vocab_size)  # + output layer


def llm_attention_flops(llm, squared_lengths: int, trainable: bool, upstream_trainable: bool) -> float:
    """Causal score/value FLOPs over samples whose squared lengths sum to `squared_lengths` (no weights: the
    backward costs 2x the forward whenever gradients flow through)."""
    forward = llm.num_layers * 2 * llm.hidden_size * squared_lengths
    return (_factor(trainable, upstream_trainable) // 2) * forward


def vit_flops_per_tile(vision, trainable: bool) -> float:
    c, f = vision.hidden_size, vision.ffn_hidden_size
    s = 1 + vision.patches_per_side**2
    n_layers = vision.select_layer % vision.num_layers + 1
    per_token = n_layers * (4 * c * c + 2 * c * f) + vision.num_channels * vision.patch_size**2 * c
    attn = n_layers * 4 * s * c  # full (non-causal) attention over the tile's s patches
    k = _factor(trainable, False)
    return s * (k * per_token + (k // 2) * attn)


def projector_flops_per_tile(model, trainable: bool, upstream_trainable: bool) -> float:
    c_in = int(model.vision.hidden_size / model.projector.downsample_ratio**2)
    h = model.llm.hidden_size
    return model.tokens_per_tile * _factor(trainable, upstream_trainable) * (c_in * h + h * h)


def step_flops(model_cfg, tokens: int, squared_lengths: int, tiles: int) -> float:
    """FLOPs of one optimizer step over `tokens` real LLM tokens in samples whose squared lengths sum to
    `squared_lengths`, and `tiles` image tiles."""
    v_tr, p_tr, l_tr = (not model_cfg.vision.freeze, not model_cfg.projector.freeze, not model_cfg.llm.freeze)
    upstream = v_tr or p_tr
    total = tokens * llm_linear_flops_per_token(model_cfg.llm, l_tr, upstream)
    total += llm_attention_flops(model_cfg.llm, squared_lengths, l_tr, upstream)
    if not model_cfg.text_only:
        total += tiles * (vit_flops_per_tile(model_cfg.vision, v_tr) + projector_flops_per_tile(model_cfg, p_tr, v_tr))
    return total


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None
