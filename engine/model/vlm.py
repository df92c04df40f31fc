"""The VLM: y = llm(merge(text_embeddings, projector(vision(tiles)))).

Each image contributes tiles; each tile becomes `tokens_per_tile` embeddings that replace, in order,
the `<IMG_CONTEXT>` placeholders of the text (InternVL: `<img><IMG_CONTEXT>*N</img>`). Rows without
images are plain text. Under pipeline parallelism the encoder and connector live on the first stage
(`pre_process`); later stages receive hidden states from the schedule through `set_input_tensor`.
"""

from __future__ import annotations

import torch

from megatron.core import tensor_parallel
from megatron.core.transformer.module import MegatronModule


class ImageTokenMismatch(ValueError):
    """The number of image placeholders in a row does not match its image features."""


def merge_image_embeddings(
    text_emb: torch.Tensor,
    tokens: torch.Tensor,
    image_emb: torch.Tensor | None,
    image_token_id: int,
    tokens_per_tile: int,
    tiles_per_row: torch.Tensor | None,
    sample_ids=None,
) -> torch.Tensor:
    """Scatter tile embeddings into the placeholder positions.

    text_emb (s, b, h), tokens (b, s), image_emb (n_tiles, tokens_per_tile, h) or None.
    Tiles are taken in row-major order over (batch row, position).
    """
    is_image = tokens == image_token_id  # (b, s)
    per_row = is_image.sum(dim=1)  # (b,)
    expected = (
        tiles_per_row.to(per_row.device) * tokens_per_tile
        if tiles_per_row is not None
        else torch.zeros_like(per_row)
    )
    n_tiles = 0 if image_emb is None else image_emb.shape[0]
    if not torch.equal(per_row, expected) or int(expected.sum()) != n_tiles * tokens_per_tile:
        for b in range(tokens.shape[0]):
            if int(per_row[b]) != int(expected[b]):
                ids = sample_ids[b] if sample_ids is not None else f"row {b}"
                raise ImageTokenMismatch(
                    f"sample {ids}: {int(per_row[b])} <IMG_CONTEXT> tokens (id {image_token_id}) but "
                    f"{int(expected[b]) // tokens_per_tile} tile(s) x {tokens_per_tile} tokens = {int(expected[b])} "
                    f"image embeddings; the chat template must expand each tile to {tokens_per_tile} placeholders"
                )
        raise ImageTokenMismatch(
            f"batch has {n_tiles} tiles of pixel_values but tiles_per_row sums to "
            f"{int(expected.sum()) // max(tokens_per_tile, 1)}"
        )
    if n_tiles == 0:
        return text_emb
    emb = text_emb.transpose(0, 1).clone()  # (b, s, h)
    emb[is_image] = image_emb.reshape(-1, image_emb.shape[-1]).to(emb.dtype)
    return emb.transpose(0, 1).contiguous()  # (s, b, h)


class VLM(MegatronModule):
    """`tp_group`: the LLM's tensor-parallel group; with sequence parallel the merged input embeddings are
    scattered over it (the LLM is built with scatter_embedding_sequence_parallel=False, so the image
    embeddings are merged into the full sequence first)."""

    def __init__(self, llm, vision=None, projector=None, *, image_token_id: int, tokens_per_tile: int, tp_group=None):
        super().__init__(config=llm.config)
        self.llm = llm
        self.tp_group = tp_group
        self.vision = vision
        self.projector = projector
        self.image_token_id = image_token_id
        self.tokens_per_tile = tokens_per_tile
        self.pre_process = llm.pre_process
        self.post_process = llm.post_process
        self.share_embeddings_and_output_weights = llm.share_embeddings_and_output_weights
        self.model_type = llm.model_type  # read by megatron's schedules

    def set_input_tensor(self, input_tensor) -> None:
        self.llm.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.llm.shared_embedding_or_output_weight()

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(n_tiles, 3, H, W) -> (n_tiles, tokens_per_tile, h_llm)."""
        return self.projector(self.vision(pixel_values))

    def forward(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        tiles_per_row: torch.Tensor | None = None,
        sample_ids=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        """Returns vocab-parallel logits (b, s, V/tp) on the last stage, hidden states elsewhere.

        With THD `packed_seq_params` (cu_seqlens over the b*s tokens taken row by row) the LLM runs on one
        packed row of b*s tokens where each sample attends only to itself; the logits come back as (b, s, V/tp)."""
        b, s = tokens.shape
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        if thd and attention_mask is not None:
            raise ValueError("give packed_seq_params or attention_mask, not both")
        decoder_input = None
        if self.pre_process:
            text_emb = self.llm.embedding(input_ids=tokens, position_ids=position_ids)  # (s, b, h)
            image_emb = None
            if pixel_values is not None and pixel_values.shape[0] > 0:
                if self.vision is None:
                    raise ValueError("this model was built text-only (model.text_only=true) but the batch has images")
                image_emb = self.image_embeddings(pixel_values)
            decoder_input = merge_image_embeddings(
                text_emb, tokens, image_emb, self.image_token_id, self.tokens_per_tile, tiles_per_row, sample_ids
            )
            if thd:
                decoder_input = decoder_input.transpose(0, 1).reshape(b * s, 1, -1)  # (b*s, 1, h), row by row
            if self.config.sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input, group=self.tp_group)
        out = self.llm(
            input_ids=tokens.reshape(1, b * s) if thd else tokens,
            position_ids=position_ids.reshape(1, b * s) if thd else position_ids,
            attention_mask=attention_mask,
            decoder_input=decoder_input,
            packed_seq_params=packed_seq_params,
        )
        if thd and self.post_process:
            out = out.reshape(b, s, -1)  # (1, b*s, V/tp) -> (b, s, V/tp)
        return out

    def freeze(self, vision: bool, projector: bool, llm: bool) -> None:
        for module, frozen in ((self.vision, vision), (self.projector, projector), (self.llm, llm)):
            if module is not None:
                for p in module.parameters():
                    p.requires_grad_(not frozen)
