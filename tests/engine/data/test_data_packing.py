"""First-fit-decreasing: native == Python, the FFD invariants, and packed loss == unpacked loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.data import packing
from engine.data.batch import collate_rows, cu_seqlens_from_segments

native = pytest.mark.skipif(not packing.native_available(), reason=f"native packer not built: {packing.NATIVE_ERROR}")


def test_native_extension_is_built():
    # `pip install -e .` builds it (CMakeLists.txt via setup.py); a missing build must be visible here.
    assert packing.native_available(), f"native packer not built ({packing.NATIVE_ERROR}); see build/native_build.log"


@native
@pytest.mark.parametrize("seed,n,cap", [(0, 1, 10), (1, 50, 64), (2, 2000, 4096), (3, 5000, 100), (4, 0, 8)])
def test_native_and_python_give_identical_packs(seed, n, cap):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, cap + 1, size=n)
    if n > 10:
        lengths[: n // 4] = rng.integers(1, 4, size=n // 4)  # many ties and small items
    a = packing.pack_ffd(lengths, cap, "native")
    b = packing.pack_ffd(lengths, cap, "python")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("impl", ["python", pytest.param("native", marks=native)])
def test_ffd_invariants(impl):
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 300, size=500)
    cap = 512
    rows = packing.pack_rows(lengths, cap, impl)
    flat = sorted(i for r in rows for i in r)
    assert flat == list(range(len(lengths)))  # every item exactly once
    loads = [int(lengths[r].sum()) for r in rows]
    assert max(loads) <= cap
    assert len(rows) <= math.ceil(11 / 9 * lengths.sum() / cap) + 1  # FFD bound: 11/9 OPT + 6/9
    # first fit: no item could have gone into an earlier row at the time it was placed
    order = np.argsort(-lengths, kind="stable")
    row_of = {i: b for b, r in enumerate(rows) for i in r}
    free = [cap] * len(rows)
    for i in order:
        b = row_of[int(i)]
        assert all(free[e] < lengths[i] for e in range(b)), "an earlier row had room"
        free[b] -= lengths[i]


@pytest.mark.parametrize("impl", ["python", pytest.param("native", marks=native)])
def test_too_long_item_is_an_error(impl):
    with pytest.raises(ValueError, match="item 1 has length 9"):
        packing.pack_ffd([3, 9, 2], 8, impl)


# ---- packed == unpacked loss, with a tiny causal attention model --------------------------------------------


class TinyLM(torch.nn.Module):
    """Embedding + RoPE-free learned positions + one causal self-attention block + LM head."""

    def __init__(self, vocab=50, dim=32, max_pos=64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g) * 0.5)
        self.pos = torch.nn.Parameter(torch.randn(max_pos, dim, generator=g) * 0.5)
        self.qkv = torch.nn.Parameter(torch.randn(dim, 3 * dim, generator=g) / dim**0.5)
        self.head = torch.nn.Parameter(torch.randn(dim, vocab, generator=g) / dim**0.5)

    def forward(self, tokens, position_ids, segment_ids):
        x = self.emb[tokens] + self.pos[position_ids]  # (B, S, D)
        q, k, v = (x @ self.qkv).chunk(3, dim=-1)  # 3 x (B, S, D)
        S = tokens.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, S, S)
        mask = causal[None] & same
        att = (q @ k.transpose(1, 2)) / q.shape[-1] ** 0.5  # (B, S, S)
        att = att.masked_fill(~mask, float("-inf")).softmax(-1)
        return (x + att @ v) @ self.head  # (B, S, V)


def per_sample_losses(model, batch):
    logits = model(batch["tokens"], batch["position_ids"], batch["segment_ids"])
    nll = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")  # (B, S)
    out = {}
    for b, ids in enumerate(batch["sample_ids"]):
        for k, sid in enumerate(ids):
            m = batch["loss_mask"][b] * (batch["segment_ids"][b] == k + 1)
            out[sid] = (nll[b] * m).sum() / m.sum()
    return out


def test_packed_loss_equals_unpacked():
    rng = np.random.default_rng(0)
    samples = []
    for k, n in enumerate([7, 12, 5, 9, 3]):
        tok = rng.integers(1, 50, size=n)
        learn = np.zeros(n, dtype=bool)
        learn[n // 2 :] = True  # the "assistant" half
        samples.append((tok, learn, f"s{k}"))
    empty = [torch.zeros(0, 3, 4, 4)]
    rows = packing.pack_rows([len(s[0]) for s in samples], 20)
    assert any(len(r) > 1 for r in rows)
    kw = dict(pad_id=0, tokens_per_tile=1, image_token_id=99, tile_size=4)
    packed = collate_rows([[samples[i] for i in r] for r in rows], [empty * len(r) for r in rows], 20, **kw)
    single = collate_rows([[s] for s in samples], [empty] * len(samples), 20, **kw)
    model = TinyLM()
    a, b = per_sample_losses(model, packed), per_sample_losses(model, single)
    assert a.keys() == b.keys() == {s[2] for s in samples}
    for sid in a:
        torch.testing.assert_close(a[sid], b[sid], rtol=1e-6, atol=1e-6)
    # and the label / mask layout: labels are the next token of the same sample only
    t, lab, m, seg = packed["tokens"], packed["labels"], packed["loss_mask"], packed["segment_ids"]
    same_next = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
    assert torch.equal(lab[:, :-1][same_next], t[:, 1:][same_next])
    assert (m[:, :-1][~same_next] == 0).all() and (m[:, -1] == 0).all()
    # with one segment per row (samples attending to each other) the packed logits change: the test can fail
    leaky = (packed["segment_ids"] > 0).long()
    logits_ok = model(packed["tokens"], packed["position_ids"], packed["segment_ids"])
    assert not torch.allclose(model(packed["tokens"], packed["position_ids"], leaky), logits_ok)


def test_cu_seqlens():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    cu, mx = cu_seqlens_from_segments(seg)
    assert cu.tolist() == [0, 2, 5, 6, 12] and mx == 6


def test_python_fallback_is_used_and_announced_when_native_is_missing():
    code = (
        "import sys, logging; logging.basicConfig(); sys.modules['engine.data._packer_native'] = None\n"
        "from engine.data import packing\n"
        "assert not packing.native_available()\n"
        "print(packing.pack_rows([5, 3, 4, 2], 8))\n"
    )
    import subprocess
    import sys
    from pathlib import Path

    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[3])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[[0, 1], [2, 3]]"  # 5 and 3 fill row 0; 4 and 2 go to row 1
    assert "native packer not built" in res.stderr
