"""Logit parity between our model (any TP/PP) and the transformers implementation of a HF checkpoint.

The reference is transformers: `InternVLForConditionalGeneration` for the native layout,
`Qwen2ForCausalLM` for a plain LLM. The InternVL-chat layout has no transformers class; its reference
is the transformers-native model built from the same weights, renamed chat -> ours -> native by the
adapters (so a chat-layout key mistake shows up as a logit difference against transformers' math).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from engine.checkpoint.adapters import ADAPTERS
from engine.checkpoint.convert import Source
from engine.checkpoint.hf_io import HFWriter, copy_aux_files


def deterministic_batch(mcfg, seed: int = 0, tiles: int = 2, text_before: int = 5, text_after: int = 7):
    """One row: text, <IMG_CONTEXT> x (tiles x tokens_per_tile), text. Text-only models: text alone."""
    g = torch.Generator().manual_seed(seed)
    vocab = mcfg.llm.vocab_size
    n_img = 0 if mcfg.text_only else tiles * mcfg.tokens_per_tile
    text = torch.randint(0, vocab - 1, (text_before + text_after,), generator=g)
    text[text >= mcfg.image_token_id] += 1  # never the image token: ids in [0, V) \ {image_token_id}
    tokens = torch.cat([text[:text_before], torch.full((n_img,), mcfg.image_token_id), text[text_before:]])[None]
    batch = {"tokens": tokens, "position_ids": torch.arange(tokens.shape[1])[None]}
    if not mcfg.text_only:
        side = mcfg.vision.image_size
        batch["pixel_values"] = torch.randn(tiles, mcfg.vision.num_channels, side, side, generator=g)
        batch["tiles_per_row"] = torch.tensor([tiles])
    return batch


@torch.no_grad()
def our_logits(model, batch, pg, vocab_size: int):
    """Full-vocab logits (b, s, V) on the last stage's TP rank 0; None elsewhere. Manual PP hand-off."""
    model.eval()
    pp_rank, pp_size = dist.get_rank(pg.pp), dist.get_world_size(pg.pp)
    if pp_rank > 0:
        s, b = batch["tokens"].shape[1], batch["tokens"].shape[0]
        hidden = torch.empty(s, b, model.config.hidden_size, dtype=model.config.params_dtype)
        dist.recv(hidden, src=dist.get_global_rank(pg.pp, pp_rank - 1), group=pg.pp)
        model.set_input_tensor(hidden)
    out = model(batch["tokens"], batch["position_ids"], None, batch.get("pixel_values"), batch.get("tiles_per_row"))
    if pp_rank < pp_size - 1:
        dist.send(out.contiguous(), dst=dist.get_global_rank(pg.pp, pp_rank + 1), group=pg.pp)
        return None
    tp_size = dist.get_world_size(pg.tp)
    if tp_size > 1:
        parts = [torch.empty_like(out) for _ in range(tp_size)]
        dist.all_gather(parts, out.contiguous(), group=pg.tp)
        out = torch.cat(parts, dim=-1)  # (b, s, V_padded)
    return out[..., :vocab_size].float() if dist.get_rank(pg.tp) == 0 else None


def _native_dir(src: Source, mcfg, tmp: Path) -> Path:
    """The chat-layout weights renamed to the transformers-native layout (via our full names)."""
    import json

    native = ADAPTERS["internvl"]
    writer = HFWriter(tmp)
    for group in native.groups(mcfg):
        chat_group = next(g for g in src.adapter.groups(mcfg)
                          if (g.part, g.layer, g.maps[0].ours) == (group.part, group.layer, group.maps[0].ours))
        ours = src.adapter.from_hf(lambda n, o: src.reader.get(n, o), mcfg, chat_group)
        for name, t in native.to_hf(ours, mcfg, group).items():
            writer.add(name, t)
    writer.close()
    (tmp / "config.json").write_text(json.dumps(native.config_to_hf(mcfg), indent=2))
    copy_aux_files(src.dir, tmp)
    return tmp


@torch.no_grad()
def hf_logits(src: Source, mcfg, batch) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, InternVLForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        if src.adapter.name == "qwen2":
            model = AutoModelForCausalLM.from_pretrained(src.dir, dtype=torch.float32)
        elif src.adapter.name == "internvl":
            model = InternVLForConditionalGeneration.from_pretrained(src.dir, dtype=torch.float32)
        elif src.adapter.name == "internvl_chat":
            model = InternVLForConditionalGeneration.from_pretrained(_native_dir(src, mcfg, Path(tmp)), dtype=torch.float32)
        else:
            raise ValueError(f"no transformers reference for layout {src.adapter.name}")
        model.eval()
        kwargs = {"input_ids": batch["tokens"], "attention_mask": torch.ones_like(batch["tokens"])}
        if "pixel_values" in batch:
            kwargs["pixel_values"] = batch["pixel_values"].float()
        return model(**kwargs).logits.float()


@torch.no_grad()
def remote_code_logits(hf_dir, batch) -> torch.Tensor:
    """Logits of an `internvl_chat` export through the modeling code it carries (AutoModel, trust_remote_code)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(hf_dir, trust_remote_code=True, dtype=torch.float32).eval()
    kwargs = {"input_ids": batch["tokens"], "attention_mask": torch.ones_like(batch["tokens"])}
    if "pixel_values" in batch:
        kwargs["pixel_values"] = batch["pixel_values"].float()
        kwargs["image_flags"] = torch.ones(batch["pixel_values"].shape[0], dtype=torch.long)
    return model(**kwargs).logits.float()


def compare(ours: torch.Tensor, ref: torch.Tensor) -> dict:
    ours, ref = ours.double(), ref.double()
    logp_ref, logp_ours = torch.log_softmax(ref, -1), torch.log_softmax(ours, -1)
    kl = (logp_ref.exp() * (logp_ref - logp_ours)).sum(-1)  # KL(hf || ours) per position
    return {
        "max_abs_logit_diff": float((ours - ref).abs().max()),
        "mean_kl": float(kl.mean()),
        "greedy_agreement": float((ours.argmax(-1) == ref.argmax(-1)).double().mean()),
        "positions": int(ref.shape[0] * ref.shape[1]),
    }


def run_parity(hf_dir, tp: int = 1, pp: int = 1, mcore_ckpt=None, image_token_id: int | None = None,
               model_dict: dict | None = None, load=None, reference: str = "transformers") -> dict:
    """Collective over TP x PP ranks: our model (converted on the fly from hf_dir, or loaded from a
    converted dist checkpoint) vs transformers on one deterministic batch. Every rank gets the metrics.

    reference: "transformers" (its own classes; for the chat layout the native InternVL on renamed weights) or
    "remote_code" (an internvl_chat export's own modeling code, through AutoModel with trust_remote_code).

    model_dict: build this model config instead of the source's / checkpoint's (e.g. another ViT padding).
    load(model, mcore_ckpt, model_config): how to fill the model from mcore_ckpt (default: mcore_io.load_model).
    """
    from engine.checkpoint.convert import engine_config, load_sources_into, open_source
    from engine.checkpoint.mcore_io import load_model, read_meta
    from engine.model.build import build_for_this_stage
    from engine.parallel.init import initialize

    src = open_source(hf_dir, image_token_id)
    md = model_dict or (src.model_dict if mcore_ckpt is None else read_meta(mcore_ckpt)["model"])
    cfg = engine_config(md, tp, pp)
    pg = initialize(cfg.parallel, seed=cfg.train.seed)
    model = build_for_this_stage(cfg, pg)
    if mcore_ckpt is None:
        load_sources_into(model, {p: src for p in src.adapter.parts}, cfg.model, pg.tp)
    else:
        (load or load_model)(model, mcore_ckpt, cfg.model)
    batch = deterministic_batch(cfg.model)
    ours = our_logits(model, batch, pg, cfg.model.llm.vocab_size)
    result = [None]
    if ours is not None:
        ref = remote_code_logits(src.dir, batch) if reference == "remote_code" else hf_logits(src, cfg.model, batch)
        result[0] = {**compare(ours, ref), "layout": src.adapter.name, "reference": reference,
                     "tp": tp, "pp": pp, "source": "mcore" if mcore_ckpt else "hf"}
    owner = [r for r in range(dist.get_world_size()) if r == dist.get_rank() and ours is not None]
    owners = [None] * dist.get_world_size()
    dist.all_gather_object(owners, owner[0] if owner else -1)
    dist.broadcast_object_list(result, src=max(owners))
    return result[0]
