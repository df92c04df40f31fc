"""MFU counts real tokens and attention over each sample's own length, not seq_length."""

from __future__ import annotations

import torch

from engine.config import load_config
from engine.train.flops import llm_attention_flops, sample_lengths, step_flops, token_stats


def test_sample_lengths_and_stats_ignore_padding_and_split_packed_rows():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
    assert sorted(sample_lengths(seg).tolist()) == [2, 3, 6]
    unpacked = torch.tensor([[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
    packed_stats = token_stats([{"segment_ids": seg, "tokens": torch.zeros(2, 8)}])
    assert packed_stats == token_stats([{"segment_ids": unpacked, "tokens": torch.zeros(3, 8)}]) == (11, 9 + 4 + 36)


def test_attention_flops_follow_sample_lengths():
    cfg = load_config(None, [])
    llm = cfg.model.llm
    # two samples of 100 tokens packed in a 200-token row: attention of 2 x 100^2, not 200^2
    assert llm_attention_flops(llm, 2 * 100**2, True, False) * 2 == llm_attention_flops(llm, 200**2, True, False)
    forward = llm.num_layers * 2 * llm.hidden_size * 100**2  # causal: 2 L^2 h per layer
    assert llm_attention_flops(llm, 100**2, False, False) == forward
    assert llm_attention_flops(llm, 100**2, True, False) == 3 * forward  # + activation and score gradients
    one_row = step_flops(cfg.model, 200, 200**2, 0)
    packed = step_flops(cfg.model, 200, 2 * 100**2, 0)
    assert one_row - packed == llm_attention_flops(llm, 200**2 - 2 * 100**2, True, True)
