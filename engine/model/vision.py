"""InternViT vision encoder on megatron-core parts.

Block (InternViT / InternVL `InternVisionEncoderLayer`):
    x = x + ls1 * attn(norm1(x))
    x = x + ls2 * mlp(norm2(x))
with LayerNorm or RMSNorm, optional q/k RMSNorm over the FULL q/k width (all heads together, as
InternViT-6B does), layer scale vectors ls1/ls2 and a GELU MLP. megatron-core's CLIP "internvit"
subtype is a different block (no layer scale, no qk norm), so the block is written here from
megatron's tensor-parallel linears, norms and core attention.

Tensor parallel: heads are split across TP ranks. The fused qkv weight is stored per head as
[head0: q, k, v][head1: q, k, v]... so a contiguous TP split hands each rank whole heads and the
full (unsplit) tensor is the same at every TP size. The qk norm reduces its sum of squares over the
TP group handed in (`tp_group`); no global parallel state is read here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule


class FullWidthRMSNorm(nn.Module):
    """RMSNorm over the full width of a tensor that is split across TP ranks on its last dim.

    Input [..., width/tp] on each rank; the mean square is summed over the TP group (autograd-aware
    all-reduce, whose backward is also an all-reduce) and divided by the full width.
    """

    def __init__(self, local_width: int, full_width: int, eps: float, tp_group=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(local_width))
        self.weight.tensor_model_parallel = True  # split along dim 0 like the heads
        self.weight.partition_dim = 0
        self.weight.partition_stride = 1
        self.full_width = full_width
        self.eps = eps
        self.tp_group = tp_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        sq_sum = x32.pow(2).sum(-1, keepdim=True)
        if self.tp_group is not None and torch.distributed.get_world_size(self.tp_group) > 1:
            sq_sum = torch.distributed.nn.functional.all_reduce(sq_sum, group=self.tp_group)
        x32 = x32 * torch.rsqrt(sq_sum / self.full_width + self.eps)
        return (self.weight * x32).to(x.dtype)


class InternViTAttention(MegatronModule):
    """Self-attention over all patches. With `padded_num_heads`, heads past the checkpoint's count are
    built with all-zero q/k/v/proj weights: their output is zero and so are their gradients, so they
    stay zero while letting TP divide the heads (InternViT-6B: 25 heads -> 32 at TP=8)."""

    def __init__(self, config, vcfg, backend, layer_number: int, tp_group):
        super().__init__(config=config)
        tp = config.tensor_model_parallel_size
        self.num_heads_local = vcfg.built_heads // tp
        self.head_dim = vcfg.head_dim
        width = vcfg.hidden_size
        inner = vcfg.built_heads * self.head_dim  # = width unless heads are padded
        self.linear_qkv = backend.column_parallel_linear()(
            width, 3 * inner, config=config, init_method=config.init_method, bias=vcfg.qkv_bias,
            gather_output=False, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="vit_qkv",
            tp_group=tp_group,
        )
        self.q_norm = self.k_norm = None
        if vcfg.qk_norm:
            local = self.num_heads_local * self.head_dim
            self.q_norm = FullWidthRMSNorm(local, width, vcfg.norm_eps, tp_group)
            self.k_norm = FullWidthRMSNorm(local, width, vcfg.norm_eps, tp_group)
        self.core_attention = backend.core_attention()(
            config=config, layer_number=layer_number, attn_mask_type=AttnMaskType.no_mask,
            attention_type="self",
        )
        self.linear_proj = backend.row_parallel_linear()(
            inner, width, config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="vit_proj",
            tp_group=tp_group,
        )
        if vcfg.built_heads > vcfg.num_attention_heads:
            self._zero_padded_heads(vcfg.num_attention_heads, tp_group)

    @torch.no_grad()
    def _zero_padded_heads(self, real_heads: int, tp_group) -> None:
        rank = torch.distributed.get_rank(tp_group) if tp_group is not None else 0
        first_global = rank * self.num_heads_local
        for local in range(self.num_heads_local):
            if first_global + local < real_heads:
                continue
            rows = slice(local * 3 * self.head_dim, (local + 1) * 3 * self.head_dim)
            self.linear_qkv.weight[rows] = 0
            if self.linear_qkv.bias is not None:
                self.linear_qkv.bias[rows] = 0
            self.linear_proj.weight[:, local * self.head_dim : (local + 1) * self.head_dim] = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, _ = x.shape  # (s, b, C)
        qkv, _ = self.linear_qkv(x)  # (s, b, 3 * C/tp), per head [q, k, v]
        qkv = qkv.view(s, b, self.num_heads_local, 3, self.head_dim)
        q, k, v = qkv.unbind(dim=3)  # each (s, b, nh, hd)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(s, b, -1)).view(s, b, self.num_heads_local, self.head_dim)
            k = self.k_norm(k.reshape(s, b, -1)).view(s, b, self.num_heads_local, self.head_dim)
        ctx = self.core_attention(q.contiguous(), k.contiguous(), v.contiguous(), attention_mask=None,
                                  attn_mask_type=AttnMaskType.no_mask)  # (s, b, nh * hd)
        out, _ = self.linear_proj(ctx)  # (s, b, C)
        return out


class InternViTLayer(MegatronModule):
    def __init__(self, config, vcfg, backend, layer_number: int, tp_group):
        super().__init__(config=config)
        norm = backend.layer_norm(rms_norm=vcfg.norm_type == "rms_norm", for_qk=False)
        self.norm1 = norm(config=config, hidden_size=vcfg.hidden_size, eps=vcfg.norm_eps)
        self.attn = InternViTAttention(config, vcfg, backend, layer_number, tp_group)
        self.ls1 = nn.Parameter(vcfg.layer_scale_init * torch.ones(vcfg.hidden_size))
        self.norm2 = norm(config=config, hidden_size=vcfg.hidden_size, eps=vcfg.norm_eps)
        self.mlp = MLP(
            config,
            MLPSubmodules(linear_fc1=backend.column_parallel_linear(), linear_fc2=backend.row_parallel_linear()),
            ffn_hidden_size=vcfg.ffn_hidden_size,
            tp_group=tp_group,
        )
        self.ls2 = nn.Parameter(vcfg.layer_scale_init * torch.ones(vcfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1 * self.attn(self.norm1(x))
        mlp_out, mlp_bias = self.mlp(self.norm2(x))
        if mlp_bias is not None:
            mlp_out = mlp_out + mlp_bias
        return x + self.ls2 * mlp_out


class InternViTEmbeddings(nn.Module):
    """Conv patch embedding + CLS token + learned absolute positions (bicubic-resized when needed)."""

    def __init__(self, vcfg):
        super().__init__()
        c = vcfg.hidden_size
        self.patch_size = vcfg.patch_size
        self.patches_per_side = vcfg.patches_per_side
        self.patch_embedding = nn.Conv2d(vcfg.num_channels, c, kernel_size=vcfg.patch_size, stride=vcfg.patch_size)
        self.class_embedding = nn.Parameter(torch.randn(1, 1, c) * 0.02)
        self.position_embedding = nn.Parameter(torch.randn(1, 1 + self.patches_per_side**2, c) * 0.02)

    def _positions(self, h: int, w: int) -> torch.Tensor:
        pos = self.position_embedding
        if h == w == self.patches_per_side:
            return pos
        n, c = self.patches_per_side, pos.shape[-1]
        grid = pos[:, 1:].float().reshape(1, n, n, c).permute(0, 3, 1, 2)  # (1, C, n, n)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        grid = grid.reshape(1, c, h * w).permute(0, 2, 1).to(pos.dtype)  # (1, h*w, C)
        return torch.cat([pos[:, :1], grid], dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, C, h, w)
        n, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (N, h*w, C)
        cls = self.class_embedding.expand(n, 1, c)
        x = torch.cat([cls, x], dim=1)  # (N, 1 + h*w, C)
        return x + self._positions(h, w)


class InternViT(MegatronModule):
    """pixel_values (N, 3, H, W) -> features (N, 1 + H/p * W/p, C) of block `select_layer`.

    recompute=True keeps only each block's input in the forward pass and recomputes the block in backward
    (megatron's tensor_parallel.checkpoint, which restores the RNG states)."""

    def __init__(self, config, vcfg, backend, tp_group=None, recompute: bool = False):
        super().__init__(config=config)
        self.recompute = recompute
        self.embeddings = InternViTEmbeddings(vcfg)
        # Blocks after the selected one never influence the output: don't build them.
        n_used = vcfg.select_layer % vcfg.num_layers + 1
        self.layers = nn.ModuleList(
            InternViTLayer(config, vcfg, backend, layer_number=i + 1, tp_group=tp_group) for i in range(n_used)
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """TP split from the parameters' own attributes (megatron's default calls a ModuleList replicated)."""
        from engine.checkpoint.sharding import tp_sharded_state_dict

        return tp_sharded_state_dict(self, prefix, sharded_offsets, metadata)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)  # (N, s, C)
        x = x.transpose(0, 1).contiguous()  # (s, N, C): megatron layers are sequence-first
        for layer in self.layers:
            if self.recompute and torch.is_grad_enabled() and x.requires_grad:
                x = tensor_parallel.checkpoint(layer, False, x)
            else:
                x = layer(x)
        return x.transpose(0, 1)  # (N, s, C)


__all__ = ["FullWidthRMSNorm", "InternViT", "InternViTLayer"]
