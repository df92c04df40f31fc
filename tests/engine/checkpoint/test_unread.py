"""hf -> mcore reads every tensor of the parts it takes, or says which it would leave (issue 13 item 12a)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint.convert import check_all_read, open_source, unread_tensors
from engine.checkpoint.hf_io import CheckpointError
from engine.config.base import from_dict
from engine.config.model import ModelConfig
from tests.engine.checkpoint.tiny_hf import make_internvl, make_qwen2, write_chat_layout


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("unread")
    nat = make_internvl(root / "nat", vocab=300, qk_norm=True, norm_type="rms_norm", seed=1)
    return {"root": root, "nat": nat, "chat": write_chat_layout(nat, root / "chat"),
            "select": make_internvl(root / "select", vocab=290, vit_layers=3, select=-2, seed=2),
            "qwen": make_qwen2(root / "qwen", vocab=257, seed=4)}


def _variant(src, dst, vision=None, llm=None, extra=None, drop_vision_keys=()):
    """A copy of a checkpoint with its config.json edited and/or a tensor added."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    for key in drop_vision_keys:
        del cfg["vision_config"][key]
    cfg.get("vision_config", {}).update(vision or {})
    (cfg.get("llm_config") if "llm_config" in cfg else cfg).update(llm or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(src / "model.safetensors"))
    save_file({**tensors, **(extra or {})}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def _whole(d):
    src = open_source(d)
    return unread_tensors({p: src for p in src.adapter.parts}, from_dict(ModelConfig, src.model_dict)), src


def test_every_tensor_of_a_matching_checkpoint_is_read(hf):
    for name in ("nat", "chat", "qwen"):
        assert _whole(hf[name])[0] == {}, name
    assert _whole(hf["select"])[0] == {}  # blocks after select_layer are exempt (not built, documented)


def test_a_vision_config_without_qk_normalization_reads_the_q_k_norms(hf):
    d = _variant(hf["chat"], hf["root"] / "chat_no_key", drop_vision_keys=["qk_normalization"])
    unread, src = _whole(d)
    assert unread == {} and src.model_dict["vision"]["qk_norm"]  # InternVisionConfig's default: true


def test_a_config_that_denies_the_q_k_norms_in_the_file_is_refused(hf):
    d = _variant(hf["chat"], hf["root"] / "chat_false", vision={"qk_normalization": False})
    unread, src = _whole(d)
    names = unread[d]
    assert len(names) == 4 and all(".attn.q_norm." in n or ".attn.k_norm." in n for n in names), names
    with pytest.raises(CheckpointError, match=r"4 tensor\(s\) would be left unread.*q_norm"):
        check_all_read({p: src for p in src.adapter.parts}, from_dict(ModelConfig, src.model_dict))


def test_a_tensor_of_no_part_and_a_stray_lm_head_are_refused(hf):
    d = _variant(hf["qwen"], hf["root"] / "qwen_extra", extra={"model.extra_proj.weight": torch.zeros(2, 2)})
    assert _whole(d)[0] == {d: ["model.extra_proj.weight"]}
    tied = _variant(hf["qwen"], hf["root"] / "qwen_tied_lm_head", llm={"tie_word_embeddings": True},
                    extra={"lm_head.weight": torch.zeros(257, 64)})
    unread, src = _whole(tied)
    assert unread == {tied: ["lm_head.weight"]}
    with pytest.raises(CheckpointError, match="ties the output layer to the embedding but the file has an lm_head"):
        check_all_read({"llm": src}, from_dict(ModelConfig, src.model_dict))


def test_parts_not_taken_from_a_source_are_not_its_unread_tensors(hf):
    # assemble: vision and connector from the VLM, LLM from Qwen2: the VLM's LLM tensors are not ours to read
    vlm, qwen = open_source(hf["nat"]), open_source(hf["qwen"])
    md = {**vlm.model_dict, "llm": qwen.model_dict["llm"]}
    assert unread_tensors({"vision": vlm, "projector": vlm, "llm": qwen}, from_dict(ModelConfig, md)) == {}
