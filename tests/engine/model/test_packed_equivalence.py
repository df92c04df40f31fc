"""Packed rows (THD, cu_seqlens from segment ids) through the VLM give each sample the loss and gradients it has
alone in its own row; the attention really receives the sample boundaries.

Runs on the CPU (fp32, SDPAttention's per-sample path) and, unchanged, on a GPU (tools/gpu_check.sh: fp32 through
the same path, plus a bf16 case through torch's varlen flash attention).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import load_config
from engine.data.batch import collate_rows
from engine.model.attention import SDPAttention, varlen_available
from engine.model.build import build_for_this_stage
from engine.parallel.device import compute_device, place_batch
from engine.train.losses import token_logprobs
from engine.train.step import model_inputs
from tests.engine.parallel.dist_worker import TINY

SEQ = 48
# (length, tiles): image samples carry tiles x 4 placeholder tokens (56 px tiles -> 4 tokens per tile)
SAMPLES = [(20, 1), (13, 0), (27, 2), (9, 0), (17, 1), (31, 0)]
PACKED_ROWS = [[0, 1, 3], [2, 4], [5]]  # 42, 44 and 31 of 48 tokens


def _samples(cfg):
    g = np.random.default_rng(0)
    tpt, img = cfg.model.tokens_per_tile, cfg.model.image_token_id
    side = cfg.model.vision.image_size
    out = []
    for i, (n, tiles) in enumerate(SAMPLES):
        tok = g.integers(10, cfg.model.llm.vocab_size, n).astype(np.int64)
        tok[2: 2 + tiles * tpt] = img
        learn = np.zeros(n, dtype=bool)
        learn[n // 3:] = True  # the "assistant" part
        pixels = torch.from_numpy(g.standard_normal((tiles, 3, side, side)).astype(np.float32))
        out.append((tok, learn, f"s{i}", pixels))
    return out


def _batch(cfg, samples, rows):
    return collate_rows([[samples[k][:3] for k in row] for row in rows], [[samples[k][3] for k in row] for row in rows],
                        SEQ, 0, cfg.model.tokens_per_tile, cfg.model.image_token_id, cfg.model.vision.image_size)


def _per_sample_losses(model, host_batch, vocab, model_segments=None) -> dict[str, torch.Tensor]:
    """Summed NLL of each sample's learned tokens, keyed by sample id (segment k+1 of a row = its k-th sample).
    `model_segments`: other segment ids to give the model (the samples are still read from the batch's)."""
    batch = place_batch(host_batch)
    fed = batch if model_segments is None else place_batch({**host_batch, "segment_ids": model_segments})
    logits = model(**model_inputs(fed))
    logprobs, _ = token_logprobs(logits, batch["labels"], None, "reference", vocab_size=vocab)
    nll = -logprobs * batch["loss_mask"]
    out = {}
    for r, ids in enumerate(host_batch["sample_ids"]):
        for k, sid in enumerate(ids):
            out[sid] = nll[r][batch["segment_ids"][r] == k + 1].sum()
    return out


def _losses_and_grads(model, host_batch, vocab):
    model.zero_grad(set_to_none=True)
    losses = _per_sample_losses(model, host_batch, vocab)
    torch.stack(list(losses.values())).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads


@pytest.fixture
def fp32_exact():
    """Full fp32 on a GPU too (TF32 convolutions / matmuls would round at 1e-3)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_packed_rows_equal_unpacked_losses_and_gradients(single_process_pg, fp32_exact, monkeypatch):
    cfg = load_config(None, TINY + [f"train.seq_length={SEQ}"])
    vocab = cfg.model.llm.vocab_size
    torch.manual_seed(0)
    model = build_for_this_stage(cfg, single_process_pg)
    samples = _samples(cfg)
    unpacked = _batch(cfg, samples, [[k] for k in range(len(samples))])
    packed = _batch(cfg, samples, PACKED_ROWS)
    assert int((packed["segment_ids"] > 1).sum()) > 0 and packed["tokens"].shape == (3, SEQ)

    seen = []  # what every LLM core attention was called with
    original = SDPAttention.forward

    def spy(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        if self.attn_mask_type.name == "causal":  # the LLM's layers (the ViT's is no_mask)
            seen.append(packed_seq_params)
        return original(self, query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)

    monkeypatch.setattr(SDPAttention, "forward", spy)
    loss_u, grad_u = _losses_and_grads(model, unpacked, vocab)
    loss_p, grad_p = _losses_and_grads(model, packed, vocab)

    # the attention path got the sample boundaries of the packed rows (row by row over the flattened b*s tokens)
    n_layers = cfg.model.llm.num_layers
    packed_calls = seen[n_layers: 2 * n_layers]
    assert len(packed_calls) == n_layers and all(p is not None and p.qkv_format == "thd" for p in packed_calls)
    ends = np.cumsum([SAMPLES[k][0] for k in PACKED_ROWS[0]]).tolist()
    expected = [0, *ends, SEQ, SEQ + 27, SEQ + 44, 2 * SEQ, 2 * SEQ + 31, 3 * SEQ]  # padding tails are segments
    assert packed_calls[0].cu_seqlens_q.tolist() == expected
    assert packed_calls[0].max_seqlen_q == 31

    assert set(loss_u) == set(loss_p) == {f"s{i}" for i in range(len(SAMPLES))}
    for sid in loss_u:
        assert abs(float(loss_u[sid] - loss_p[sid])) < 1e-5 * max(1.0, abs(float(loss_u[sid]))), sid
    assert set(grad_u) == set(grad_p) and len(grad_u) > 40
    for name in grad_u:
        diff = float((grad_u[name] - grad_p[name]).abs().max())
        assert diff < 1e-5, (name, diff)

    # a packed row WITHOUT boundaries (samples see their row neighbours) changes the losses: the boundaries matter
    one_segment_per_row = (packed["segment_ids"] > 0).long()  # 1 everywhere but padding
    with torch.no_grad():
        loss_leak = _per_sample_losses(model, packed, vocab, model_segments=one_segment_per_row)
    leaked = [sid for sid in ("s1", "s3", "s4") if abs(float(loss_leak[sid] - loss_u[sid])) > 1e-3]
    assert leaked == ["s1", "s3", "s4"]  # every sample that follows another in its row


@pytest.mark.gpu
def test_packed_bf16_varlen_flash_matches_per_sample_sdpa(single_process_pg):
    """On a GPU in bf16 the packed path is one varlen flash-attention call; it matches the per-sample SDPA loop."""
    cfg = load_config(None, TINY + [f"train.seq_length={SEQ}", "model.params_dtype=bfloat16"])
    torch.manual_seed(0)
    model = build_for_this_stage(cfg, single_process_pg)
    packed = _batch(cfg, _samples(cfg), PACKED_ROWS)
    attn = model.llm.decoder.layers[0].self_attention.core_attention
    q = torch.randn(8, 2, 16, device=compute_device(), dtype=torch.bfloat16)
    assert varlen_available(q), "torch.nn.attention.varlen is missing on this GPU build"
    with torch.no_grad():
        flash = _per_sample_losses(model, packed, cfg.model.llm.vocab_size)
        import engine.model.attention as attention_module

        saved = attention_module.varlen_available
        attention_module.varlen_available = lambda q: False
        try:
            loop = _per_sample_losses(model, packed, cfg.model.llm.vocab_size)
        finally:
            attention_module.varlen_available = saved
    assert isinstance(attn, SDPAttention)
    for sid in flash:  # bf16: ~3 significant digits per op, 4 layers
        assert abs(float(flash[sid] - loop[sid])) < 2e-2 * max(1.0, abs(float(loop[sid]))), sid
