"""Model FLOPs per training step (ViT + connector + LLM), for the MFU estimate.

Per token and linear layer of N weights: forward 2N, backward 2N for activation gradients (needed when
anything upstream trains) + 2N for weight gradients (when the layer itself trains). Attention scores
and values cost 4*s*h per token per layer forward; causal attention counts half of that.
"""

from __future__ import annotations

# Dense bf16 tensor-core peak (no sparsity), from NVIDIA's datasheets.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def _factor(trainable: bool, upstream_trainable: bool) -> int:
    return 2 + (2 if (trainable or upstream_trainable) else 0) + (2 if trainable else 0)


def llm_flops_per_token(llm, seq_length: int, trainable: bool, upstream_trainable: bool) -> float:
    h, f, L = llm.hidden_size, llm.ffn_hidden_size, llm.num_layers
    kv = h // llm.num_attention_heads * llm.num_query_groups
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * f  # qkv, proj, SwiGLU fc1 (2f) + fc2
    linear = L * per_layer + h * llm.vocab_size  # + output layer
    attn = L * 4 * seq_length * h / 2  # causal
    return _factor(trainable, upstream_trainable) * linear + (_factor(trainable, upstream_trainable) // 2) * attn


def vit_flops_per_tile(vision, trainable: bool) -> float:
    c, f = vision.hidden_size, vision.ffn_hidden_size
    s = 1 + vision.patches_per_side**2
    n_layers = vision.select_layer % vision.num_layers + 1
    per_token = n_layers * (4 * c * c + 2 * c * f) + vision.num_channels * vision.patch_size**2 * c
    attn = n_layers * 4 * s * c
    k = _factor(trainable, False)
    return s * (k * per_token + (k // 2) * attn)


def projector_flops_per_tile(model, trainable: bool, upstream_trainable: bool) -> float:
    c_in = int(model.vision.hidden_size / model.projector.downsample_ratio**2)
    h = model.llm.hidden_size
    return model.tokens_per_tile * _factor(trainable, upstream_trainable) * (c_in * h + h * h)


def step_flops(model_cfg, seq_length: int, tokens: int, tiles: int) -> float:
    """FLOPs of one optimizer step that processed `tokens` LLM tokens and `tiles` image tiles."""
    v_tr, p_tr, l_tr = (not model_cfg.vision.freeze, not model_cfg.projector.freeze, not model_cfg.llm.freeze)
    total = tokens * llm_flops_per_token(model_cfg.llm, seq_length, l_tr, v_tr or p_tr)
    if not model_cfg.text_only:
        total += tiles * (vit_flops_per_tile(model_cfg.vision, v_tr) + projector_flops_per_tile(model_cfg, p_tr, v_tr))
    return total


def device_peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None
