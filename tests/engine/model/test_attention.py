"""SDPAttention (our local-spec core attention) computes what megatron's DotProductAttention computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.model.attention import SDPAttention


def _config(heads=4, groups=2, d=8, **kw):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=heads * d, num_attention_heads=heads, num_query_groups=groups,
                             kv_channels=d, attention_dropout=0.0, hidden_dropout=0.0, masked_softmax_fusion=False,
                             use_cpu_initialization=True, **kw)


def _pair(single_process_pg, mask_type, **kw):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    cfg = _config(**kw)
    args = dict(config=cfg, layer_number=3, attn_mask_type=getattr(AttnMaskType, mask_type), attention_type="self",
                pg_collection=single_process_pg)
    return DotProductAttention(**args), SDPAttention(**args)


def _qkv(sq, sk, b=2, heads=4, groups=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(sq, b, heads, d, generator=g), torch.randn(sk, b, groups, d, generator=g),
            torch.randn(sk, b, groups, d, generator=g))


@pytest.mark.parametrize("mask_type", ["causal", "no_mask"])
def test_matches_dot_product_attention(single_process_pg, mask_type):
    ref, ours = _pair(single_process_pg, mask_type)
    q, k, v = _qkv(11, 11)
    torch.testing.assert_close(ours(q, k, v, None), ref(q, k, v, None), rtol=1e-5, atol=1e-6)


def test_explicit_mask_and_decode_step(single_process_pg):
    """The native rollout engine's padded prefill mask and its one-query decode step over a longer cache."""
    ref, ours = _pair(single_process_pg, "causal")
    q, k, v = _qkv(6, 6)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    key_valid = torch.tensor([[False, False, True, True, True, True], [True] * 6])  # row 0 left-padded by 2
    mask = ~(causal[None] & key_valid[:, None, :])[:, None]  # (b, 1, 6, 6), True = masked
    got, want = ours(q, k, v, mask), ref(q, k, v, mask)
    torch.testing.assert_close(got[2:], want[2:], rtol=1e-5, atol=1e-6)
    assert torch.isfinite(got).all()  # row 0's padded queries see no key: finite (zeros), never NaN
    torch.testing.assert_close(got[:, 1], want[:, 1], rtol=1e-5, atol=1e-6)
    q1, k9, v9 = _qkv(1, 9, seed=1)
    decode_mask = torch.zeros(2, 1, 1, 9, dtype=torch.bool)
    torch.testing.assert_close(ours(q1, k9, v9, decode_mask), ref(q1, k9, v9, decode_mask), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="needs an explicit attention_mask"):
        ours(q1, k9, v9, None)


def test_query_key_layer_scaling_keeps_the_scale(single_process_pg):
    ref, ours = _pair(single_process_pg, "causal", apply_query_key_layer_scaling=True, fp16=True)
    q, k, v = _qkv(7, 7)
    assert ours.scale == pytest.approx(1 / 8**0.5)
    expected = F.scaled_dot_product_attention(*(x.permute(1, 2, 0, 3) for x in (
        q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2))), is_causal=True)
    torch.testing.assert_close(ours(q, k, v, None), expected.permute(2, 0, 1, 3).reshape(7, 2, -1))


def test_packed_thd_is_per_sample_causal(single_process_pg):
    from megatron.core.packed_seq_params import PackedSeqParams

    _, ours = _pair(single_process_pg, "causal")
    lengths = [5, 3, 8]
    q, k, v = (x[:, 0] for x in _qkv(16, 16, b=1))  # THD: [t, heads, d]
    cu = torch.tensor([0, 5, 8, 16], dtype=torch.int32)
    packed = ours(q, k, v, None, packed_seq_params=PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=8, max_seqlen_kv=8))
    start = 0
    for n in lengths:  # each sample alone, as a batch of one
        alone = ours(*(x[start: start + n, None] for x in (q, k, v)), None)[:, 0]
        torch.testing.assert_close(packed[start: start + n], alone, rtol=1e-5, atol=1e-6)
        start += n
    assert packed.shape == (16, 4 * 8)
