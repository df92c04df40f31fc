"""Conversion checks run in a child process (single) or under torchrun (2 ranks); results -> JSON.

    python ckpt_worker.py single ROOT        fixtures, TP=1 conversions, round trips, assembly, errors
    torchrun -n 2 ckpt_worker.py dist ROOT   TP=2 / PP=2 parity, TP=2 / PP=2 writes (after `single`)
    python ckpt_worker.py export ROOT        mcore -> hf of the TP=2 / PP=2 written checkpoints (after `dist`)

The pytest side asserts on the JSON, one test per case.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from safetensors import safe_open  # noqa: E402

FP32_HF = {  # name -> builder kwargs; every case is a different corner of the mapping
    "nat_gqa": dict(kind="internvl", vocab=301, heads=4, kv_heads=2, tied=False),  # odd vocab, GQA, untied
    "nat_tied": dict(kind="internvl", vocab=300, heads=4, kv_heads=2, tied=True, qk_norm=True,
                     norm_type="rms_norm", qkv_bias=True, seed=1),  # InternViT-6B style blocks, tied
    "nat_select": dict(kind="internvl", vocab=290, vit_layers=3, select=-2, seed=2),  # select_layer != -1
    "qwen_a": dict(kind="qwen2", vocab=333, heads=4, kv_heads=2, tied=False, seed=3, salt="q", image_token_id=331),
    "qwen_tied": dict(kind="qwen2", vocab=257, heads=4, kv_heads=4, tied=True, seed=4),
    # 3 ViT heads do not split over TP=2 (InternViT-6B's 25 over TP=8): zero heads are added (to 8)
    "nat_pad": dict(kind="internvl", vocab=300, vit_hidden=96, vit_heads=3, qk_norm=True, norm_type="rms_norm", seed=6),
}


def tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def bit_identical(a: Path, b: Path, only_prefix: str | None = None, rename=None) -> dict:
    ta, tb = tensors(a), tensors(b)
    if only_prefix is not None:
        ta = {k: v for k, v in ta.items() if k.startswith(only_prefix)}
    if rename:
        ta = {rename(k): v for k, v in ta.items()}
    if rename or only_prefix is not None:
        tb = {k: v for k, v in tb.items() if k in ta}
    diff = sorted(k for k in ta if k not in tb or ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k]))
    return {"same_keys": set(ta) == set(tb), "n": len(ta), "differing": diff[:5], "missing": sorted(set(ta) ^ set(tb))[:5]}


def stored(ckpt: Path) -> dict:
    """Every tensor (global, as stored) and object of a dist checkpoint, read with torch DCP alone."""
    import io

    from torch.distributed.checkpoint import FileSystemReader, load

    md = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) if hasattr(v, "size") else io.BytesIO() for k, v in md.items()}
    load(sd, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)
    return sd


def same_stored(a: Path, b: Path) -> dict:
    """Two dist checkpoints hold the same keys, shapes, dtypes and bytes (however they are chunked)."""
    ta, tb = stored(a), stored(b)
    diff = sorted(k for k in ta if k not in tb or (
        not (ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k]))
        if isinstance(ta[k], torch.Tensor) else ta[k] != tb[k]))
    return {"same_keys": set(ta) == set(tb), "n": len(ta), "differing": diff[:5],
            "files": sorted(p.name for p in b.glob("*.distcp"))}


def _error_of(fn) -> str:
    try:
        fn()
    except BaseException as e:  # the message is what the test checks (torch DCP raises BaseExceptions)
        if isinstance(e, KeyboardInterrupt):
            raise
        return f"{type(e).__name__}: {e}"
    return "NO ERROR"


def _long_parity(hf_dir: Path, n_tokens: int) -> dict:
    """run_parity's comparison (TP=1, converted on the fly) on a text batch of n_tokens."""
    from engine.checkpoint.convert import engine_config, load_sources_into, open_source
    from engine.checkpoint.parity import compare, deterministic_batch, hf_logits, our_logits
    from engine.model.build import build_for_this_stage
    from engine.parallel.init import initialize

    src = open_source(hf_dir)
    cfg = engine_config(src.model_dict)
    pg = initialize(cfg.parallel, seed=cfg.train.seed)
    model = build_for_this_stage(cfg, pg)
    load_sources_into(model, {p: src for p in src.adapter.parts}, cfg.model, pg.tp)
    batch = deterministic_batch(cfg.model, text_before=n_tokens // 2, text_after=n_tokens - n_tokens // 2)
    return compare(our_logits(model, batch, pg, cfg.model.llm.vocab_size), hf_logits(src, cfg.model, batch))


def _remote_class(export: Path) -> str:
    from transformers import AutoModel

    return type(AutoModel.from_pretrained(export, trust_remote_code=True, dtype=torch.float32)).__name__


def _generate_both(chat_export: Path, native_dir: Path, n: int = 5) -> dict:
    """Greedy tokens of the chat export's own generate() and of transformers' native InternVL, same weights."""
    from transformers import AutoModel, InternVLForConditionalGeneration

    from engine.checkpoint.convert import engine_config, open_source
    from engine.checkpoint.parity import deterministic_batch

    batch = deterministic_batch(engine_config(open_source(native_dir).model_dict).model)
    kw = dict(input_ids=batch["tokens"], attention_mask=torch.ones_like(batch["tokens"]),
              pixel_values=batch["pixel_values"].float(), max_new_tokens=n, do_sample=False)
    remote = AutoModel.from_pretrained(chat_export, trust_remote_code=True, dtype=torch.float32).eval()
    native = InternVLForConditionalGeneration.from_pretrained(native_dir, dtype=torch.float32).eval()
    ours = remote.generate(**kw)  # the new tokens
    ref = native.generate(**kw)[:, batch["tokens"].shape[1]:]
    return {"remote_code": ours.tolist(), "transformers": ref.tolist()}


def single(root: Path) -> dict:
    from tiny_hf import make_internvl, make_qwen2, write_chat_layout

    from engine.checkpoint.convert import (
        assemble_model_dict, engine_config, hf_to_mcore, mcore_to_hf, open_source, tokenizer_report,
    )
    from engine.checkpoint.mcore_io import load_model
    from engine.checkpoint.parity import compare, deterministic_batch, hf_logits, run_parity

    res: dict = {}
    hf = root / "hf"
    for name, kw in FP32_HF.items():
        kw = dict(kw)
        (make_internvl if kw.pop("kind") == "internvl" else make_qwen2)(hf / name, **kw)
    write_chat_layout(hf / "nat_gqa", hf / "chat_gqa")
    write_chat_layout(hf / "nat_tied", hf / "sky_tied", arch="SkyworkR1VChatModel")
    make_qwen2(hf / "qwen_bf16", vocab=301, dtype=torch.bfloat16, seed=5)

    def to_mcore(name, tp=1, pp=1):
        src = open_source(hf / name)
        out = root / "mc" / name
        hf_to_mcore({p: src for p in src.adapter.parts}, src.model_dict, out, tp=tp, pp=pp, show_progress=False)
        return out

    cases = ["nat_gqa", "nat_tied", "nat_select", "chat_gqa", "sky_tied", "qwen_a", "qwen_tied"]
    for name in cases + ["qwen_bf16"]:
        mc = to_mcore(name)
        if name != "qwen_bf16":
            res[f"parity/{name}/tp1"] = run_parity(hf / name, mcore_ckpt=mc)
        layout = open_source(hf / name).adapter.name
        out = root / "export" / name
        res[f"memory/{name}"] = mcore_to_hf(mc, out, layout, show_progress=False)
        if name != "nat_select":  # a truncated encoder is not the same tensor set (checked below)
            res[f"roundtrip/{name}"] = bit_identical(hf / name, out)
        if name != "qwen_bf16" and layout != "internvl_chat":  # transformers loads the export and agrees
            src, exp = open_source(hf / name), open_source(out)
            mcfg = engine_config(src.model_dict).model
            batch = deterministic_batch(mcfg)
            res[f"from_pretrained/{name}"] = compare(hf_logits(exp, mcfg, batch), hf_logits(src, mcfg, batch))
    res["dtype/qwen_bf16"] = sorted({str(t.dtype) for t in tensors(root / "export" / "qwen_bf16").values()})

    # A chat vision_config without qk_normalization is InternViT-6B's qk-normed block (InternVL's default):
    # converted, it equals transformers on the original native checkpoint (explicit use_qk_norm=true).
    import shutil

    shutil.copytree(hf / "sky_tied", hf / "sky_nokey")
    cfg = json.loads((hf / "sky_nokey" / "config.json").read_text())
    del cfg["vision_config"]["qk_normalization"], cfg["vision_config"]["norm_type"]  # (its qkv_bias=true stays)
    (hf / "sky_nokey" / "config.json").write_text(json.dumps(cfg))
    res["parity/sky_nokey_vs_native_source"] = run_parity(hf / "nat_tied", mcore_ckpt=to_mcore("sky_nokey"))

    # dynamic NTK RoPE (InternVL3's llm_config): plain RoPE below max_position_embeddings
    from tiny_hf import make_qwen2 as _q

    dyn = {"rope_type": "dynamic", "factor": 2.0}
    _q(hf / "qwen_dyn", vocab=300, seed=7, rope_scaling=dyn)
    mc = to_mcore("qwen_dyn")
    res["parity/qwen_dyn/tp1"] = run_parity(hf / "qwen_dyn", mcore_ckpt=mc)
    mcore_to_hf(mc, root / "export" / "qwen_dyn", "qwen2", show_progress=False)
    res["roundtrip/qwen_dyn"] = bit_identical(hf / "qwen_dyn", root / "export" / "qwen_dyn")
    res["rope/exported_parameters"] = json.loads((root / "export" / "qwen_dyn" / "config.json").read_text())["rope_parameters"]
    # ... and why the engine stays below it: 400 tokens past max_position_embeddings=300, transformers rescales
    # the base for dynamic NTK (logits differ) and extrapolates plain RoPE like ours without it
    _q(hf / "qwen_dyn300", vocab=300, seed=7, max_pos=300, rope_scaling=dyn)
    _q(hf / "qwen_plain300", vocab=300, seed=7, max_pos=300)
    res["rope/dynamic_past_max_pos"] = _long_parity(hf / "qwen_dyn300", 400)
    res["rope/plain_past_max_pos"] = _long_parity(hf / "qwen_plain300", 400)

    # select_layer=-2 of 3 blocks: the export keeps the 2 used blocks and reads the last (-1)
    cfg = json.loads((root / "export" / "nat_select" / "config.json").read_text())
    res["select/export_config"] = [cfg["vision_config"]["num_hidden_layers"], cfg["vision_feature_layer"]]
    res["select/extra_block_dropped"] = not any(".layer.2." in k for k in tensors(root / "export" / "nat_select"))

    # chat <-> native: the same weights, bit for bit, through our names
    mcore_to_hf(root / "mc" / "chat_gqa", root / "export" / "chat_as_native", "internvl", show_progress=False)
    res["cross/chat_to_native"] = bit_identical(hf / "nat_gqa", root / "export" / "chat_as_native")
    mcore_to_hf(root / "mc" / "nat_tied", root / "export" / "native_as_chat", "internvl_chat", show_progress=False)
    res["cross/native_to_chat"] = bit_identical(hf / "sky_tied", root / "export" / "native_as_chat")
    res["cross/native_to_chat_parity"] = run_parity(root / "export" / "native_as_chat")
    mcore_to_hf(root / "mc" / "nat_gqa", root / "export" / "llm_only", "qwen2", show_progress=False)
    res["cross/vlm_llm_to_qwen2"] = bit_identical(
        hf / "nat_gqa", root / "export" / "llm_only", only_prefix="language_model.",
        rename=lambda k: k[len("language_model."):])

    # the chat export's own modeling code (AutoModel, trust_remote_code) against our megatron model
    mcore_to_hf(root / "mc" / "nat_select", root / "export" / "select_as_chat", "internvl_chat", show_progress=False)
    for name, export, ckpt in (("chat_gqa", "chat_gqa", "chat_gqa"), ("sky_tied", "sky_tied", "sky_tied"),
                               ("native_as_chat", "native_as_chat", "nat_tied"), ("select", "select_as_chat", "nat_select")):
        res[f"remote_code/{name}"] = run_parity(root / "export" / export, mcore_ckpt=root / "mc" / ckpt,
                                                reference="remote_code")
    res["remote_code/class"] = _remote_class(root / "export" / "sky_tied")
    res["remote_code/generate"] = _generate_both(root / "export" / "chat_gqa", hf / "nat_gqa")

    # re-assembly: vision from an InternViT-only checkpoint (nat_gqa's encoder, exported as one), connector
    # from nat_gqa, LLM from qwen_a (another tokenizer and vocab)
    mcore_to_hf(root / "mc" / "nat_gqa", root / "export" / "vit_only", "internvit", show_progress=False)
    vit, vis, llm = open_source(root / "export" / "vit_only"), open_source(hf / "nat_gqa"), open_source(hf / "qwen_a")
    res["assemble/vit_only_layout"] = vit.adapter.name
    res["assemble/notes"] = tokenizer_report(vit, vis, llm)
    md = assemble_model_dict(vit, vis, llm)
    hf_to_mcore({"vision": vit, "projector": vis, "llm": llm}, md, root / "mc" / "assembled", tp=1, pp=1,
                show_progress=False)
    mcore_to_hf(root / "mc" / "assembled", root / "export" / "assembled", "internvl", show_progress=False)
    res["assemble/vision"] = bit_identical(hf / "nat_gqa", root / "export" / "assembled", only_prefix="vision_tower.")
    res["assemble/connector"] = bit_identical(hf / "nat_gqa", root / "export" / "assembled", only_prefix="multi_modal_projector.")
    res["assemble/llm"] = bit_identical(hf / "qwen_a", root / "export" / "assembled",
                                        rename=lambda k: "language_model." + k)
    res["assemble/image_token_id"] = md["image_token_id"]
    res["assemble/parity"] = run_parity(root / "export" / "assembled", mcore_ckpt=root / "mc" / "assembled")
    res["assemble/no_img_token"] = _error_of(lambda: assemble_model_dict(vis, vis, open_source(hf / "qwen_tied")))
    qwide = make_qwen2(root / "hf" / "qwen_wide", hidden=128, vocab=301, image_token_id=299, seed=6)
    res["assemble/connector_misfit"] = _error_of(lambda: assemble_model_dict(vis, vis, open_source(qwide)))

    # errors: config mismatch, damaged dist checkpoint, damaged / missing HF shard
    from engine.model.build import build_for_this_stage
    from engine.parallel.init import initialize

    other = dict(open_source(hf / "nat_gqa").model_dict)
    other["llm"] = {**other["llm"], "num_layers": 4}
    cfg = engine_config(other)
    model = build_for_this_stage(cfg, initialize(cfg.parallel))
    res["error/config_mismatch"] = _error_of(lambda: load_model(model, root / "mc" / "nat_gqa", cfg.model))

    # the training loop's save: load, save again at step 7, read back
    from engine.checkpoint.mcore_io import read_meta, save_checkpoint

    cfg = engine_config(open_source(hf / "nat_gqa").model_dict)
    model = build_for_this_stage(cfg, initialize(cfg.parallel))
    load_model(model, root / "mc" / "nat_gqa", cfg.model)
    save_checkpoint(model, cfg.model, root / "mc" / "resaved", step=7, tokenizer_path=None, tp=1, pp=1)
    res["resave/step"] = read_meta(root / "mc" / "resaved")["step"]
    res["resave/parity"] = run_parity(hf / "nat_gqa", mcore_ckpt=root / "mc" / "resaved")
    # the piece writer stores what megatron's own save stores (`resaved` came from dist_checkpointing.save)
    res["lazy/equals_megatron_save"] = same_stored(root / "mc" / "resaved", root / "mc" / "nat_gqa")
    # 1 KiB pieces: every sliceable tensor in many row ranges, the vocab padding rows (301 -> 384) too
    src = open_source(hf / "nat_gqa")
    rep = hf_to_mcore({p: src for p in src.adapter.parts}, src.model_dict, root / "mc" / "nat_gqa_1k", tp=1, pp=1,
                      show_progress=False, max_piece_bytes=1024)
    res["lazy/small_pieces"] = {**same_stored(root / "mc" / "nat_gqa", root / "mc" / "nat_gqa_1k"),
                                "pieces": rep["pieces"], "largest_piece_bytes": rep["largest_piece_bytes"]}
    res["lazy/stored_keys"] = len(stored(root / "mc" / "nat_gqa"))  # for scale
    # nat_pad at TP=1: 3 ViT heads, no padding (read at TP=2, padded to 8, in `dist`)
    to_mcore("nat_pad")
    # one process writes a TP=2 checkpoint (compared with the one 2 processes write, in `dist`)
    src = open_source(hf / "nat_tied")
    hf_to_mcore({p: src for p in src.adapter.parts}, src.model_dict, root / "mc" / "nat_tied_tp2_1proc", tp=2, pp=1,
                show_progress=False)

    # interop with the trainer's checkpoints (engine/train/checkpointing.py), both directions
    from engine.config.base import to_dict
    from engine.train import checkpointing as trainer_ckpt

    cfg = engine_config(open_source(hf / "nat_gqa").model_dict)
    model = build_for_this_stage(cfg, initialize(cfg.parallel))
    res["trainer/init_from_converted_step"] = trainer_ckpt.load_model_only(root / "mc" / "nat_gqa", model)["step"]
    trainer_ckpt.save_checkpoint(root / "run", 5, model, None, trainer_state={}, meta={"config": to_dict(cfg)},
                                 keep=1)
    mcore_to_hf(root / "run" / "checkpoints" / "latest", root / "export" / "from_trainer", "internvl",
                show_progress=False)  # a run's pointer file names the step dir
    res["trainer/export_of_training_checkpoint"] = bit_identical(hf / "nat_gqa", root / "export" / "from_trainer")
    import shutil

    broken = root / "mc_broken"
    shutil.copytree(root / "mc" / "qwen_a", broken)
    for f in broken.glob("*.distcp"):
        f.unlink()
        break
    res["error/missing_distcp"] = _error_of(lambda: mcore_to_hf(broken, root / "x1", "qwen2", show_progress=False))
    res["error/missing_distcp_no_output"] = not (root / "x1").exists() and not (root / "x1.partial").exists()
    bad = root / "hf_bad"
    shutil.copytree(hf / "qwen_a", bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])  # a truncated download
    res["error/truncated_safetensors"] = _error_of(
        lambda: hf_to_mcore({"llm": open_source(bad)}, open_source(bad).model_dict, root / "x2", tp=1, pp=1,
                            show_progress=False))
    (bad / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage" + data[:64])
    res["error/corrupt_header"] = _error_of(
        lambda: hf_to_mcore({"llm": open_source(bad)}, open_source(bad).model_dict, root / "x3", tp=1, pp=1,
                            show_progress=False))
    res["error/no_partial_left"] = not any(root.glob("x*.partial"))
    return res


def dist_checks(root: Path) -> dict:
    import torch.distributed as dist

    from engine.checkpoint.convert import hf_to_mcore, open_source
    from engine.checkpoint.parity import run_parity

    hf, res = root / "hf", {}
    res["parity/nat_gqa/tp2_from_hf"] = run_parity(hf / "nat_gqa", tp=2)
    res["parity/chat_gqa/tp2_from_tp1_ckpt"] = run_parity(hf / "chat_gqa", tp=2, mcore_ckpt=root / "mc" / "chat_gqa")
    res["parity/qwen_a/tp2_from_tp1_ckpt"] = run_parity(hf / "qwen_a", tp=2, mcore_ckpt=root / "mc" / "qwen_a")
    res["parity/nat_tied/pp2_from_hf"] = run_parity(hf / "nat_tied", pp=2)
    res["parity/sky_tied/pp2_from_tp1_ckpt"] = run_parity(hf / "sky_tied", pp=2, mcore_ckpt=root / "mc" / "sky_tied")
    for name, tp, pp in (("nat_tied", 2, 1), ("chat_gqa", 1, 2), ("qwen_tied", 1, 2), ("nat_pad", 2, 1)):
        src = open_source(hf / name)
        out = root / "mc_dist" / f"{name}_tp{tp}pp{pp}"
        hf_to_mcore({p: src for p in src.adapter.parts}, src.model_dict, out, tp=tp, pp=pp, show_progress=False)
        res[f"parity/{name}/tp{tp}pp{pp}_written_and_read"] = run_parity(hf / name, tp=tp, pp=pp, mcore_ckpt=out)
        # written at one layout, read at the other
        res[f"parity/{name}/written_tp{tp}pp{pp}_read_tp{pp}pp{tp}"] = run_parity(hf / name, tp=pp, pp=tp, mcore_ckpt=out)
    # ViT heads re-padded at load: a TP=1 conversion (3 heads, no padding) into TP=2 models (padded to 8),
    # by the converter's loader and by the trainer's (train.init_from)
    from engine.train import checkpointing as trainer_ckpt

    res["parity/nat_pad/tp2_from_unpadded_tp1_ckpt"] = run_parity(hf / "nat_pad", tp=2, mcore_ckpt=root / "mc" / "nat_pad")
    res["parity/nat_pad/tp2_init_from_unpadded_tp1_ckpt"] = run_parity(
        hf / "nat_pad", tp=2, mcore_ckpt=root / "mc" / "nat_pad",
        load=lambda model, ckpt, _: trainer_ckpt.load_model_only(ckpt, model))
    dist.barrier()
    if dist.get_rank() == 0:  # the same checkpoint, written by one process (in `single`) and by two here
        res["lazy/tp2_one_vs_two_processes"] = same_stored(root / "mc" / "nat_tied_tp2_1proc",
                                                           root / "mc_dist" / "nat_tied_tp2pp1")
    return res


def export_dist_written(root: Path) -> dict:
    from engine.checkpoint.convert import engine_config, mcore_to_hf
    from engine.checkpoint.mcore_io import load_model, read_meta, save_checkpoint
    from engine.checkpoint.parity import run_parity
    from engine.model.build import build_for_this_stage
    from engine.parallel.init import initialize

    res = {}
    # ViT padding dropped at load: the TP=2 checkpoint (heads padded 3 -> 8) into a TP=1 model without padding
    padded = root / "mc_dist" / "nat_pad_tp2pp1"
    md = read_meta(padded)["model"]
    res["vit_pad/written_padding"] = md["vision"]["padded_num_heads"]
    unpadded = {**md, "vision": {**md["vision"], "padded_num_heads": 0}}
    res["parity/nat_pad/tp1_unpadded_from_padded_tp2_ckpt"] = run_parity(root / "hf" / "nat_pad", mcore_ckpt=padded,
                                                                         model_dict=unpadded)
    # ... but padding heads that are not zero are not padding: refused, not cut off
    cfg = engine_config(md)
    model = build_for_this_stage(cfg, initialize(cfg.parallel))
    load_model(model, padded, cfg.model)
    with torch.no_grad():
        model.vision.layers[0].attn.linear_qkv.weight[-1] = 1.0  # a row of the last (padding) head
    save_checkpoint(model, cfg.model, root / "mc_bad_padding", step=0, tokenizer_path=None, tp=1, pp=1)
    cfg0 = engine_config(unpadded)
    model0 = build_for_this_stage(cfg0, initialize(cfg0.parallel))
    res["error/nonzero_padding"] = _error_of(lambda: load_model(model0, root / "mc_bad_padding", cfg0.model))

    # the chat export of the TP=2-written, head-padded checkpoint through its own modeling code
    mcore_to_hf(padded, root / "export_dist" / "nat_pad_chat", "internvl_chat", show_progress=False)
    res["remote_code/nat_pad_tp2"] = run_parity(root / "export_dist" / "nat_pad_chat", mcore_ckpt=padded,
                                                reference="remote_code")

    for ckpt, layout, source in (("nat_tied_tp2pp1", "internvl", "nat_tied"), ("chat_gqa_tp1pp2", "internvl_chat", "chat_gqa"),
                                 ("qwen_tied_tp1pp2", "qwen2", "qwen_tied"), ("nat_pad_tp2pp1", "internvl", "nat_pad")):
        out = root / "export_dist" / ckpt
        mcore_to_hf(root / "mc_dist" / ckpt, out, layout, show_progress=False)
        res[ckpt] = bit_identical(root / "hf" / source, out)
    return res


if __name__ == "__main__":
    mode, root = sys.argv[1], Path(sys.argv[2])
    try:
        results = {"single": single, "dist": dist_checks, "export": export_dist_written}[mode](root)
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        (root / f"results_{mode}.json").write_text(json.dumps(results, indent=1, default=str))
    if dist.is_initialized():
        dist.destroy_process_group()
