"""The one key-mapping table between our parameter names and the HF checkpoint layouts.

Our names are the "full" form of `engine.parallel.full_state` (TP=1/PP=1 tensors, global layer index,
unpadded vocab). Each HF layout is a choice, per model part, of a key prefix and a naming *style*:

    style    used by
    hf       Qwen2 decoder (`model.layers.*`, `lm_head`), every layout's LLM
    native   transformers' InternVLForConditionalGeneration vision tower / projector
    chat     InternVL-chat / Skywork-R1V `vision_model.*` / `mlp1.*`, and InternViT-only checkpoints

A rule maps one of our tensors to one or more HF tensors with a `fuse` kind saying how they combine:

    copy           1:1
    cat            ours = cat(hf..., dim 0)                 (SwiGLU fc1 = [gate; up])
    llm_qkv        megatron GQA layout <- separate q/k/v:   per query group g: [q heads of g; k_g; v_g]
    vit_qkv        per-head [q, k, v] interleave <- separate q/k/v
    vit_qkv_fused  per-head [q, k, v] interleave <- one fused [q; k; v] tensor
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from engine.config.model import ModelConfig


@dataclass(frozen=True)
class Rule:
    ours: str  # name relative to the part, "{i}" = layer index
    hf: dict  # style -> (tuple of HF names relative to the part prefix, fuse kind)
    when: str = "always"  # predicate name in _WHEN: is the tensor present for this config?


def _r(ours: str, when: str = "always", **styles) -> Rule:
    return Rule(ours, {k: (tuple(v[0]) if isinstance(v[0], (tuple, list)) else (v[0],), v[1]) for k, v in styles.items()}, when)


C = "copy"

LLM_RULES = (
    _r("embedding.word_embeddings.weight", hf=("model.embed_tokens.weight", C)),
    _r("decoder.final_layernorm.weight", hf=("model.norm.weight", C)),
    _r("output_layer.weight", "untied", hf=("lm_head.weight", C)),
    _r("decoder.layers.{i}.input_layernorm.weight", hf=("model.layers.{i}.input_layernorm.weight", C)),
    _r("decoder.layers.{i}.self_attention.linear_qkv.weight",
       hf=(["model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
            "model.layers.{i}.self_attn.v_proj.weight"], "llm_qkv")),
    _r("decoder.layers.{i}.self_attention.linear_qkv.bias", "llm_qkv_bias",
       hf=(["model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
            "model.layers.{i}.self_attn.v_proj.bias"], "llm_qkv")),
    _r("decoder.layers.{i}.self_attention.linear_proj.weight", hf=("model.layers.{i}.self_attn.o_proj.weight", C)),
    _r("decoder.layers.{i}.pre_mlp_layernorm.weight", hf=("model.layers.{i}.post_attention_layernorm.weight", C)),
    _r("decoder.layers.{i}.mlp.linear_fc1.weight",
       hf=(["model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"], "cat")),
    _r("decoder.layers.{i}.mlp.linear_fc2.weight", hf=("model.layers.{i}.mlp.down_proj.weight", C)),
)

_NL, _CL = "encoder.layer.{i}.", "encoder.layers.{i}."  # native / chat layer prefixes

VISION_RULES = (
    _r("embeddings.patch_embedding.weight",
       native=("embeddings.patch_embeddings.projection.weight", C), chat=("embeddings.patch_embedding.weight", C)),
    _r("embeddings.patch_embedding.bias",
       native=("embeddings.patch_embeddings.projection.bias", C), chat=("embeddings.patch_embedding.bias", C)),
    _r("embeddings.class_embedding", native=("embeddings.cls_token", C), chat=("embeddings.class_embedding", C)),
    _r("embeddings.position_embedding",
       native=("embeddings.position_embeddings", C), chat=("embeddings.position_embedding", C)),
    _r("layers.{i}.norm1.weight", native=(_NL + "layernorm_before.weight", C), chat=(_CL + "norm1.weight", C)),
    _r("layers.{i}.norm1.bias", "vit_norm_bias",
       native=(_NL + "layernorm_before.bias", C), chat=(_CL + "norm1.bias", C)),
    _r("layers.{i}.attn.linear_qkv.weight",
       native=([_NL + "attention.q_proj.weight", _NL + "attention.k_proj.weight", _NL + "attention.v_proj.weight"],
               "vit_qkv"),
       chat=(_CL + "attn.qkv.weight", "vit_qkv_fused")),
    _r("layers.{i}.attn.linear_qkv.bias", "vit_qkv_bias",
       native=([_NL + "attention.q_proj.bias", _NL + "attention.k_proj.bias", _NL + "attention.v_proj.bias"],
               "vit_qkv"),
       chat=(_CL + "attn.qkv.bias", "vit_qkv_fused")),
    _r("layers.{i}.attn.q_norm.weight", "vit_qk_norm",
       native=(_NL + "attention.q_norm.weight", "vit_headvec"), chat=(_CL + "attn.q_norm.weight", "vit_headvec")),
    _r("layers.{i}.attn.k_norm.weight", "vit_qk_norm",
       native=(_NL + "attention.k_norm.weight", "vit_headvec"), chat=(_CL + "attn.k_norm.weight", "vit_headvec")),
    _r("layers.{i}.attn.linear_proj.weight",
       native=(_NL + "attention.projection_layer.weight", "vit_proj"), chat=(_CL + "attn.proj.weight", "vit_proj")),
    _r("layers.{i}.attn.linear_proj.bias",
       native=(_NL + "attention.projection_layer.bias", C), chat=(_CL + "attn.proj.bias", C)),
    _r("layers.{i}.ls1", native=(_NL + "lambda_1", C), chat=(_CL + "ls1", C)),
    _r("layers.{i}.ls2", native=(_NL + "lambda_2", C), chat=(_CL + "ls2", C)),
    _r("layers.{i}.norm2.weight", native=(_NL + "layernorm_after.weight", C), chat=(_CL + "norm2.weight", C)),
    _r("layers.{i}.norm2.bias", "vit_norm_bias",
       native=(_NL + "layernorm_after.bias", C), chat=(_CL + "norm2.bias", C)),
    _r("layers.{i}.mlp.linear_fc1.weight", native=(_NL + "mlp.fc1.weight", C), chat=(_CL + "mlp.fc1.weight", C)),
    _r("layers.{i}.mlp.linear_fc1.bias", native=(_NL + "mlp.fc1.bias", C), chat=(_CL + "mlp.fc1.bias", C)),
    _r("layers.{i}.mlp.linear_fc2.weight", native=(_NL + "mlp.fc2.weight", C), chat=(_CL + "mlp.fc2.weight", C)),
    _r("layers.{i}.mlp.linear_fc2.bias", native=(_NL + "mlp.fc2.bias", C), chat=(_CL + "mlp.fc2.bias", C)),
)

# InternVL-chat's mlp1 = Sequential(LayerNorm, Linear, GELU, Linear): indices 0, 1, 3.
PROJECTOR_RULES = (
    _r("layer_norm.weight", native=("layer_norm.weight", C), chat=("0.weight", C)),
    _r("layer_norm.bias", native=("layer_norm.bias", C), chat=("0.bias", C)),
    _r("linear_fc1.weight", native=("linear_1.weight", C), chat=("1.weight", C)),
    _r("linear_fc1.bias", native=("linear_1.bias", C), chat=("1.bias", C)),
    _r("linear_fc2.weight", native=("linear_2.weight", C), chat=("3.weight", C)),
    _r("linear_fc2.bias", native=("linear_2.bias", C), chat=("3.bias", C)),
)

PARTS = {"llm": ("llm.", LLM_RULES), "vision": ("vision.", VISION_RULES), "projector": ("projector.", PROJECTOR_RULES)}

_WHEN: dict[str, Callable[[ModelConfig], bool]] = {
    "always": lambda m: True,
    "untied": lambda m: not m.llm.tie_embeddings,
    "llm_qkv_bias": lambda m: m.llm.qkv_bias,
    "vit_norm_bias": lambda m: m.vision.norm_type == "layer_norm",
    "vit_qkv_bias": lambda m: m.vision.qkv_bias,
    "vit_qk_norm": lambda m: m.vision.qk_norm,
}


def num_layers(part: str, mcfg: ModelConfig) -> int:
    """Layers the checkpoint carries: the LLM's all, the encoder's up to select_layer (the rest is unused)."""
    if part == "llm":
        return mcfg.llm.num_layers
    if part == "vision":
        return mcfg.vision.select_layer % mcfg.vision.num_layers + 1
    return 0


# ----------------------------------------------------------------------------------------------------
# Fusing: HF tensors (list) -> ours, and the inverse. Shapes: d = head dim, C = ViT width.
# ----------------------------------------------------------------------------------------------------


def _llm_heads(m: ModelConfig) -> tuple[int, int, int]:
    return m.llm.num_attention_heads, m.llm.num_query_groups, m.llm.hidden_size // m.llm.num_attention_heads


def _vit_heads(m: ModelConfig) -> tuple[int, int]:
    return m.vision.num_attention_heads, m.vision.hidden_size // m.vision.num_attention_heads


def _vit_pad(m: ModelConfig) -> int:
    """Extra all-zero heads our ViT is built with (model.vision.padded_num_heads; InternViT-6B at TP=8)."""
    return m.vision.built_heads - m.vision.num_attention_heads


def fuse(kind: str, hf: list[torch.Tensor], m: ModelConfig) -> torch.Tensor:
    if kind == "copy":
        return hf[0]
    if kind == "cat":
        return torch.cat(hf, dim=0)
    if kind == "llm_qkv":
        nq, ng, d = _llm_heads(m)
        q, k, v = hf
        rest = q.shape[1:]
        q = q.reshape(ng, nq // ng * d, *rest)  # (groups, heads per group * d, ...)
        k, v = k.reshape(ng, d, *rest), v.reshape(ng, d, *rest)
        return torch.cat([q, k, v], dim=1).reshape((nq + 2 * ng) * d, *rest)
    if kind in ("vit_qkv", "vit_qkv_fused"):
        nh, d = _vit_heads(m)
        qkv = torch.stack(hf[0].chunk(3, dim=0) if kind == "vit_qkv_fused" else hf)  # (3, C, ...)
        rest = qkv.shape[2:]
        qkv = qkv.reshape(3, nh, d, *rest).transpose(0, 1)  # (nh, 3, d, ...)
        qkv = qkv.reshape(3 * nh * d, *rest)
        return torch.cat([qkv, qkv.new_zeros(3 * _vit_pad(m) * d, *rest)]).contiguous()  # padded heads: zero
    if kind == "vit_proj":  # (C, nh*d) -> (C, built*d), zero columns for padded heads
        d = _vit_heads(m)[1]
        return torch.cat([hf[0], hf[0].new_zeros(hf[0].shape[0], _vit_pad(m) * d)], dim=1).contiguous()
    if kind == "vit_headvec":  # q/k norm weight (nh*d) -> (built*d); padded heads see only zeros
        d = _vit_heads(m)[1]
        return torch.cat([hf[0], hf[0].new_ones(_vit_pad(m) * d)]).contiguous()
    raise ValueError(f"unknown fuse kind {kind!r}")


def split(kind: str, ours: torch.Tensor, m: ModelConfig) -> list[torch.Tensor]:
    if kind == "copy":
        return [ours]
    if kind == "cat":
        return [t.contiguous() for t in ours.chunk(2, dim=0)]
    if kind == "llm_qkv":
        nq, ng, d = _llm_heads(m)
        rest = ours.shape[1:]
        grouped = ours.reshape(ng, (nq // ng + 2) * d, *rest)  # (groups, [q..; k; v], ...)
        q, k, v = grouped.split([nq // ng * d, d, d], dim=1)
        return [q.reshape(nq * d, *rest).contiguous(), k.reshape(ng * d, *rest).contiguous(),
                v.reshape(ng * d, *rest).contiguous()]
    if kind in ("vit_qkv", "vit_qkv_fused"):
        nh, d = _vit_heads(m)
        rest = ours.shape[1:]
        qkv = ours[: 3 * nh * d].reshape(nh, 3, d, *rest).transpose(0, 1).reshape(3, nh * d, *rest)  # (3, C, ...)
        if kind == "vit_qkv_fused":
            return [qkv.reshape(3 * nh * d, *rest).contiguous()]
        return [t.contiguous() for t in qkv.unbind(0)]
    if kind == "vit_proj":
        nh, d = _vit_heads(m)
        return [ours[:, : nh * d].contiguous()]
    if kind == "vit_headvec":
        nh, d = _vit_heads(m)
        return [ours[: nh * d].contiguous()]
    raise ValueError(f"unknown fuse kind {kind!r}")


@dataclass(frozen=True)
class Mapping:
    """One of our full tensors <-> its HF tensors (absolute names)."""

    ours: str
    hf: tuple[str, ...]
    fuse: str


def mappings(part: str, prefix: str, style: str, mcfg: ModelConfig, layer: int | None) -> list[Mapping]:
    """The mappings of one tensor group: a part's non-layer tensors (layer=None) or one layer's."""
    our_prefix, rules = PARTS[part]
    out = []
    for rule in rules:
        if ("{i}" in rule.ours) != (layer is not None) or not _WHEN[rule.when](mcfg):
            continue
        names, kind = rule.hf[style]
        fmt = {"i": layer} if layer is not None else {}
        out.append(Mapping(our_prefix + rule.ours.format(**fmt), tuple(prefix + n.format(**fmt) for n in names), kind))
    return out
