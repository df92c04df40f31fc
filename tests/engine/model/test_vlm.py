"""VLM pieces on one process: connector math, placeholder merge, padded heads, frozen parts."""

from __future__ import annotations

import pytest
import torch
from transformers.models.internvl.modeling_internvl import InternVLModel

from engine.config import load_config
from engine.model.build import build_vlm
from engine.model.projector import pixel_shuffle
from engine.model.vlm import ImageTokenMismatch
from tests.engine.parallel.dist_worker import TINY


def tiny_cfg(*extra):
    return load_config(None, TINY + list(extra))


def test_pixel_shuffle_equals_transformers_internvl():
    x = torch.randn(3, 8, 8, 20)  # (N, w, h, C)
    ours = pixel_shuffle(x, 0.5)
    theirs = InternVLModel.pixel_shuffle(None, x, 0.5)
    assert ours.shape == (3, 4, 4, 80)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def _inputs(cfg, tiles=(1, 0), seq=32):
    g = torch.Generator().manual_seed(0)
    b = len(tiles)
    tokens = torch.randint(10, cfg.model.llm.vocab_size, (b, seq), generator=g)
    for row, n in enumerate(tiles):
        tokens[row, 2 : 2 + n * cfg.model.tokens_per_tile] = cfg.model.image_token_id
    side = cfg.model.vision.image_size
    return dict(
        tokens=tokens,
        position_ids=torch.arange(seq).repeat(b, 1),
        pixel_values=torch.randn(sum(tiles), 3, side, side, generator=g),
        tiles_per_row=torch.tensor(tiles),
        sample_ids=[[f"s{row}"] for row in range(b)],
    )


def test_placeholder_mismatch_names_the_sample(single_process_pg):
    cfg = tiny_cfg()
    model = build_vlm(cfg, single_process_pg)
    inputs = _inputs(cfg, tiles=(1, 0))
    inputs["tiles_per_row"] = torch.tensor([2, 0])  # claims 2 tiles, text has placeholders for 1
    inputs["pixel_values"] = torch.randn(2, 3, 56, 56)
    with pytest.raises(ImageTokenMismatch, match=r"sample \['s0'\]: 4 <IMG_CONTEXT> tokens .* 2 tile\(s\)"):
        model(**inputs)


def test_text_only_row_is_independent_of_image_rows(single_process_pg):
    cfg = tiny_cfg()
    model = build_vlm(cfg, single_process_pg).eval()
    mixed = _inputs(cfg, tiles=(2, 0))
    with torch.no_grad():
        both = model(**mixed)
        alone = model(tokens=mixed["tokens"][1:], position_ids=mixed["position_ids"][1:],
                      tiles_per_row=torch.tensor([0]), sample_ids=[["s1"]])
        swapped_pixels = model(**{**mixed, "pixel_values": mixed["pixel_values"].flip(0)})
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)
    # and the image row really depends on its pixels (tiles are consumed in order)
    assert (both[0] - swapped_pixels[0]).abs().max() > 1e-4


def test_padded_vision_heads_equal_unpadded(single_process_pg):
    """2 real heads padded to 4 (as InternViT-6B's 25 -> 32 for TP=8) give the same features."""
    base = ["model.vision.num_attention_heads=2", "model.vision.hidden_size=64"]
    cfg = tiny_cfg(*base)
    cfg_pad = tiny_cfg(*base, "model.vision.padded_num_heads=4")
    torch.manual_seed(0)
    plain = build_vlm(cfg, single_process_pg).vision
    padded = build_vlm(cfg_pad, single_process_pg).vision
    with torch.no_grad():
        for (n, p), (n2, q) in zip(plain.named_parameters(), padded.named_parameters()):
            assert n == n2
            if p.shape == q.shape:
                q.copy_(p)
            elif n.endswith("linear_qkv.weight"):
                assert q[p.shape[0]:].abs().max() == 0  # padded heads start at zero
                q[: p.shape[0]] = p
            elif n.endswith("linear_proj.weight"):
                assert q[:, p.shape[1]:].abs().max() == 0
                q[:, : p.shape[1]] = p
            elif n.endswith(("q_norm.weight", "k_norm.weight")):
                q[: p.shape[0]] = p
            else:
                raise AssertionError(f"unexpected shape change for {n}: {p.shape} -> {q.shape}")
        x = torch.randn(2, 3, 56, 56)
        torch.testing.assert_close(plain(x), padded(x), rtol=1e-5, atol=1e-5)
    assert padded.layers[0].attn.num_heads_local == 4


def test_position_embeddings_interpolate_for_other_tile_sizes(single_process_pg):
    cfg = tiny_cfg()
    vit = build_vlm(cfg, single_process_pg).vision
    assert vit.embeddings._positions(4, 4) is vit.embeddings.position_embedding
    out = vit(torch.randn(1, 3, 84, 84))  # 6x6 patches instead of 4x4
    assert out.shape == (1, 1 + 36, cfg.model.vision.hidden_size)


def test_select_layer_builds_only_needed_blocks(single_process_pg):
    cfg = tiny_cfg("model.vision.num_layers=3", "model.vision.select_layer=-2")
    assert len(build_vlm(cfg, single_process_pg).vision.layers) == 2
