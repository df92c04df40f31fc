"""The HF processor files vLLM needs to serve our VLM (transformers-native InternVL layout).

vLLM tiles images itself with the processor saved next to the weights, so the processor mirrors our
data config: tile size, min/max tiles and the thumbnail rule (GotOcr2ImageProcessor's crop_to_patches
is InternVL's dynamic tiling). transformers' InternVLProcessor also needs the tokenizer to name its
image tokens (and a video token); the copy written here declares them. The trainer never uses vLLM's
tiles: it recomputes log-probs on our own pipeline's tiles, and the difference is logged as the
train/rollout log-prob mismatch.
"""

from __future__ import annotations

from pathlib import Path

IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}


def write_internvl_processor(out: str | Path, tokenizer_dir: str | Path, data_cfg, tokens_per_tile: int) -> None:
    from transformers import AutoTokenizer, GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor


    from tokenizers import AddedToken, Tokenizer
    from transformers import PreTrainedTokenizerFast

    base = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    missing = [t for t in IMAGE_TOKENS.values() if t not in base.get_vocab() and t != "<video>"]
    if missing:
        raise ValueError(f"tokenizer {tokenizer_dir} lacks {missing}; vLLM's InternVL processor needs them")
    core = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
    if "<video>" not in base.get_vocab():
        # never emitted or used for images; only InternVLProcessor's constructor insists on a video token
        core.add_special_tokens([AddedToken("<video>", special=True)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=base.eos_token, pad_token=base.pad_token,
                                  extra_special_tokens=dict(IMAGE_TOKENS))
    if base.chat_template:
        tok.chat_template = base.chat_template
    side = data_cfg.tile_size
    images = GotOcr2ImageProcessor(size={"height": side, "width": side}, crop_to_patches=data_cfg.max_tiles > 1,
                                   min_patches=data_cfg.min_tiles, max_patches=data_cfg.max_tiles)
    videos = InternVLVideoProcessor(size={"height": side, "width": side})
    InternVLProcessor(image_processor=images, tokenizer=tok, video_processor=videos,
                      image_seq_length=tokens_per_tile).save_pretrained(str(out))
