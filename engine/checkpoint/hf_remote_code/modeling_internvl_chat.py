"""InternVL-chat / Skywork-R1V model: InternViT -> pixel shuffle -> MLP connector (`mlp1`) -> LLM.

Written by vlm-reason-engine for its `mcore-to-hf --layout internvl_chat` exports, so that
`AutoModel.from_pretrained(dir, trust_remote_code=True)` loads them offline. Parameter names (`vision_model.*`,
`mlp1.{0,1,3}`, `language_model.*`) and the math are those of InternVL's `InternVLChatModel` and Skywork's
`SkyworkR1VChatModel`; the logits equal the engine's megatron model (tests/engine/checkpoint). What this file
does not carry: InternVL's conversation templates, so no `chat()` / `batch_chat()` -- build the prompt with
the tokenizer's chat template and write an image as `<img>` + `<IMG_CONTEXT>` x (tiles x num_image_token) +
`</img>`, then call `generate(pixel_values=..., input_ids=..., attention_mask=...)`. No LoRA wrapping.

Image features: the ViT's hidden state `select_layer` without the class token, pixel-shuffled by
`downsample_ratio` (v2: 2x2 neighbouring patches -> one token of 4x the width), then
LayerNorm -> Linear -> GELU -> Linear. They replace the embeddings of the `<IMG_CONTEXT>` tokens in order.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_internvl_chat import InternVLChatConfig, SkyworkChatConfig
from .modeling_intern_vit import InternVisionModel


def pixel_shuffle(x: torch.Tensor, scale: float, version: str = "v2") -> torch.Tensor:
    """(N, W, H, C) -> (N, W*scale, H*scale, C/scale^2). v1 leaves the result transposed (InternVL's ps v1)."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))  # (N, W, H*s, C/s)
    x = x.permute(0, 2, 1, 3).reshape(n, int(h * scale), int(w * scale), int(c / scale**2))  # (N, H*s, W*s, C/s^2)
    if version == "v1":
        warnings.warn("ps_version v1: height and width stay swapped (as in InternVL's v1 checkpoints)")
        return x
    return x.permute(0, 2, 1, 3).contiguous()  # back to (N, W*s, H*s, C/s^2)


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    main_input_name = "pixel_values"
    base_model_prefix = ""
    _no_split_modules = ["InternVisionEncoderLayer", "Qwen2DecoderLayer", "LlamaDecoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True

    def __init__(self, config: InternVLChatConfig, vision_model=None, language_model=None):
        super().__init__(config)
        if config.use_backbone_lora or config.use_llm_lora:
            raise ValueError("this model code has no LoRA wrapping; merge the LoRA weights first")
        vision = config.vision_config
        image_size = config.force_image_size or vision.image_size
        self.select_layer = config.select_layer
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.num_image_token = int((image_size // vision.patch_size) ** 2 * config.downsample_ratio**2)
        self.img_context_token_id = config.img_context_token_id
        self.vision_model = vision_model or InternVisionModel(vision)
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.llm_config)
        shuffled = vision.hidden_size * int(1 / config.downsample_ratio) ** 2
        llm_width = config.llm_config.hidden_size
        self.mlp1 = nn.Sequential(nn.LayerNorm(shuffled), nn.Linear(shuffled, llm_width), nn.GELU(),
                                  nn.Linear(llm_width, llm_width))
        self.post_init()

    def _init_weights(self, module):  # only for weights a checkpoint lacks (the submodels init their own)
        if module in (self.mlp1[1], self.mlp1[3]):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif module is self.mlp1[0]:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # -- embeddings --------------------------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, H, W) -> (tiles, num_image_token, LLM width)."""
        if self.select_layer == -1:
            feats = self.vision_model(pixel_values=pixel_values).last_hidden_state
        else:  # hidden_states[0] is the embeddings, [i] block i's output
            out = self.vision_model(pixel_values=pixel_values, output_hidden_states=True)
            feats = out.hidden_states[self.select_layer]
        feats = feats[:, 1:]  # drop the class token: (tiles, h*w, C)
        side = int(feats.shape[1] ** 0.5)
        feats = pixel_shuffle(feats.reshape(feats.shape[0], side, side, -1), self.downsample_ratio, self.ps_version)
        return self.mlp1(feats.reshape(feats.shape[0], -1, feats.shape[-1]))

    def _merged_embeddings(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                           image_flags: torch.Tensor | None) -> torch.Tensor:
        embeds = self.get_input_embeddings()(input_ids)  # (B, S, D)
        if pixel_values is None:
            return embeds
        if self.img_context_token_id is None:
            raise ValueError("img_context_token_id is not set: give it in config.json or set "
                             "model.img_context_token_id")
        feats = self.extract_feature(pixel_values)
        if image_flags is not None:  # tiles flagged 0 are padding tiles of a batch
            feats = feats[image_flags.reshape(-1) == 1]
        feats = feats.reshape(-1, feats.shape[-1]).to(embeds.dtype)
        slots = input_ids == self.img_context_token_id
        if int(slots.sum()) != feats.shape[0]:
            raise ValueError(f"{int(slots.sum())} <IMG_CONTEXT> tokens for {feats.shape[0]} image features "
                             f"({self.num_image_token} per tile)")
        return embeds.masked_scatter(slots.unsqueeze(-1), feats)

    # -- forward / generate ------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                image_flags: torch.Tensor | None = None, past_key_values=None, labels: torch.Tensor | None = None,
                use_cache: bool | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None, **kwargs):
        embeds = self._merged_embeddings(input_ids, pixel_values, image_flags)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  past_key_values=past_key_values, use_cache=use_cache,
                                  output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                                  return_dict=True, **kwargs)
        loss = None
        if labels is not None:  # next-token cross entropy, -100 ignored
            logits = out.logits[:, :-1].float()
            targets = labels[:, 1:].reshape(-1).to(logits.device)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
        result = CausalLMOutputWithPast(loss=loss, logits=out.logits, past_key_values=out.past_key_values,
                                        hidden_states=out.hidden_states, attentions=out.attentions)
        return result if return_dict is not False else result.to_tuple()

    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, visual_features: torch.Tensor | None = None,
                 **generate_kwargs):
        """The LLM's generate on the merged embeddings; returns only the new tokens (as InternVL's does)."""
        if visual_features is not None:
            raise ValueError("visual_features is not supported; pass pixel_values")
        embeds = self._merged_embeddings(input_ids, pixel_values, None)
        return self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)


class SkyworkR1VChatModel(InternVLChatModel):
    """Skywork-R1V: the same model under Skywork's config class (`model_type` skywork_chat)."""

    config_class = SkyworkChatConfig
