"""InternVL connector: pixel shuffle (drops CLS) -> LayerNorm -> Linear -> GELU -> Linear (TP)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.transformer.module import MegatronModule


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """InternVL's pixel shuffle (ps_version v2), exactly as InternVL / transformers do it.

    x: (N, h, w, C) -> (N, h*ratio, w*ratio, C/ratio^2); ratio 0.5 merges 2x2 patches.
    """
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * ratio), int(c / ratio))  # (N, w, h*r, C/r)
    x = x.permute(0, 2, 1, 3).contiguous()  # (N, h*r, w, C/r)
    x = x.reshape(n, int(h * ratio), int(w * ratio), int(c / (ratio * ratio)))  # (N, h*r, w*r, C/r^2)
    return x.permute(0, 2, 1, 3).contiguous()  # (N, w*r, h*r, C/r^2)


class Projector(MegatronModule):
    """ViT features (N, 1 + h*w, C_vit) -> LLM embeddings (N, h*w*r^2, C_llm)."""

    def __init__(self, config, pcfg, vision_width: int, llm_width: int, backend, tp_group=None):
        super().__init__(config=config)
        self.ratio = pcfg.downsample_ratio
        in_width = int(vision_width / self.ratio**2)
        self.layer_norm = nn.LayerNorm(in_width, eps=pcfg.norm_eps)
        self.linear_fc1 = backend.column_parallel_linear()(
            in_width, llm_width, config=config, init_method=config.init_method, bias=True,
            gather_output=False, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="proj_fc1",
            tp_group=tp_group,
        )
        self.linear_fc2 = backend.row_parallel_linear()(
            llm_width, llm_width, config=config, init_method=config.output_layer_init_method, bias=True,
            input_is_parallel=True, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="proj_fc2",
            tp_group=tp_group,
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """TP split from the parameters' own attributes (see engine/checkpoint/sharding.py)."""
        from engine.checkpoint.sharding import tp_sharded_state_dict

        return tp_sharded_state_dict(self, prefix, sharded_offsets, metadata)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features[:, 1:]  # drop CLS: (N, h*w, C)
        n, hw, c = x.shape
        side = int(hw**0.5)
        x = pixel_shuffle(x.reshape(n, side, side, c), self.ratio)  # (N, h', w', 4C)
        x = x.reshape(n, -1, x.shape[-1])  # (N, tokens_per_tile, 4C)
        x = self.layer_norm(x).transpose(0, 1)  # (tokens, N, 4C): megatron linears are seq-first
        x, _ = self.linear_fc1(x)  # (tokens, N, C_llm/tp)
        x, _ = self.linear_fc2(F.gelu(x))  # (tokens, N, C_llm)
        return x.transpose(0, 1)  # (N, tokens, C_llm)
