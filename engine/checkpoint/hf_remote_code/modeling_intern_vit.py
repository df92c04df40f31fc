"""InternViT vision encoder, as `InternVisionModel` of InternVL-chat / Skywork-R1V checkpoints computes it.

Written by vlm-reason-engine for its `mcore-to-hf --layout internvl_chat` exports (loaded with
`AutoModel.from_pretrained(dir, trust_remote_code=True)`). Parameter names are those of InternVL's published
modeling code, so the published weights load into it and its weights into that code; the math is the same
(tested against the engine's megatron model to the parity tolerance of tools/check_hf_parity.py). Plain
PyTorch attention (scaled_dot_product_attention): no flash-attn import; `use_flash_attn` is accepted and
ignored. Dropout and drop-path are not applied (they are training settings of the publisher).

Block: x = x + ls1 * attn(norm1(x)); x = x + ls2 * mlp(norm2(x)). Attention: fused qkv (heads contiguous,
[q; k; v]), optional RMSNorm of q and k over the full width (all heads together), output projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

from .configuration_intern_vit import InternVisionConfig


class InternRMSNorm(nn.Module):
    """RMSNorm in fp32, scaled after the cast back (InternVL's InternRMSNorm)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(dtype)


def _norm(config: InternVisionConfig, width: int) -> nn.Module:
    if config.norm_type == "rms_norm":
        return InternRMSNorm(width, eps=config.layer_norm_eps)
    if config.norm_type == "layer_norm":
        return nn.LayerNorm(width, eps=config.layer_norm_eps)
    raise ValueError(f"norm_type={config.norm_type!r}: expected 'rms_norm' or 'layer_norm'")


class InternVisionEmbeddings(nn.Module):
    """Conv patches + a class token + learned positions (bicubic-resized for another patch grid)."""

    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.image_size = config.image_size
        self.patch_size = config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, self.embed_dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, self.embed_dim, kernel_size=self.patch_size,
                                         stride=self.patch_size)
        self.num_patches = (self.image_size // self.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.randn(1, self.num_patches + 1, self.embed_dim))

    def _patch_positions(self, h: int, w: int) -> torch.Tensor:
        pos = self.position_embedding[:, 1:]
        side = self.image_size // self.patch_size
        if (h, w) == (side, side):
            return pos
        grid = pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, C, side, side)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return grid.reshape(1, -1, h * w).permute(0, 2, 1).to(pos.dtype)  # (1, h*w, C)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype))  # (N, C, h, w)
        n, _, h, w = patches.shape
        patches = patches.flatten(2).transpose(1, 2)  # (N, h*w, C)
        cls = self.class_embedding.expand(n, 1, -1).to(dtype)
        positions = torch.cat([self.position_embedding[:, :1], self._patch_positions(h, w)], dim=1)
        return torch.cat([cls, patches], dim=1) + positions.to(dtype)  # (N, 1 + h*w, C)


class InternAttention(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f"hidden_size={self.embed_dim} is not divisible by num_attention_heads={self.num_heads}")
        self.qkv = nn.Linear(self.embed_dim, 3 * self.embed_dim, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            self.q_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
            self.k_norm = InternRMSNorm(self.embed_dim, eps=config.layer_norm_eps)
        self.proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)  # [q; k; v], heads contiguous
        q, k, v = qkv.unbind(2)  # each (b, n, heads, d)
        if self.qk_normalization:  # over the full width, all heads together
            q = self.q_norm(q.flatten(-2)).view(b, n, self.num_heads, self.head_dim)
            k = self.k_norm(k.flatten(-2)).view(b, n, self.num_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (b, h, n, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class InternMLP(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        width = config.hidden_size
        self.attn = InternAttention(config)
        self.mlp = InternMLP(config)
        self.norm1 = _norm(config, width)
        self.norm2 = _norm(config, width)
        self.ls1 = nn.Parameter(config.initializer_factor * torch.ones(width))
        self.ls2 = nn.Parameter(config.initializer_factor * torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, config: InternVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(InternVisionEncoderLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, x: torch.Tensor, output_hidden_states: bool = False) -> BaseModelOutput:
        states = (x,) if output_hidden_states else None  # index 0: the embeddings
        for layer in self.layers:
            x = layer(x)
            if output_hidden_states:
                states += (x,)
        return BaseModelOutput(last_hidden_state=x, hidden_states=states)


class InternVisionModel(PreTrainedModel):
    config_class = InternVisionConfig
    main_input_name = "pixel_values"
    base_model_prefix = ""
    _no_split_modules = ["InternVisionEncoderLayer"]

    def __init__(self, config: InternVisionConfig):
        super().__init__(config)
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)
        self.post_init()

    def _init_weights(self, module):  # only for weights a checkpoint lacks
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, InternRMSNorm)):
            nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, InternVisionEmbeddings):
            nn.init.normal_(module.class_embedding, std=std)
            nn.init.normal_(module.position_embedding, std=std)
        elif isinstance(module, InternVisionEncoderLayer):
            nn.init.constant_(module.ls1, self.config.initializer_factor)
            nn.init.constant_(module.ls2, self.config.initializer_factor)

    def get_input_embeddings(self):
        return self.embeddings

    def forward(self, pixel_values: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, pixel_embeds: torch.Tensor | None = None):
        if pixel_values is None and pixel_embeds is None:
            raise ValueError("pass pixel_values (N, 3, H, W) or pixel_embeds")
        if pixel_embeds is None and pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (N, 3, H, W), got {tuple(pixel_values.shape)}")
        x = pixel_embeds if pixel_embeds is not None else self.embeddings(pixel_values)
        out = self.encoder(x, output_hidden_states=bool(output_hidden_states))
        pooled = out.last_hidden_state[:, 0]  # the class token
        if return_dict is False:
            return (out.last_hidden_state, pooled) + ((out.hidden_states,) if output_hidden_states else ())
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=pooled,
                                          hidden_states=out.hidden_states)
