"""The InternVL-chat export's own configuration code (`engine/checkpoint/hf_remote_code`): transformers
loads an exported config.json offline with `trust_remote_code=True`, every field we write comes back,
and a transformers save / reload keeps them. No megatron, no vLLM (those: test_vllm_load.py; the modeling
code's logits against our megatron model: test_conversion.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.checkpoint.adapters import ADAPTERS, check_model_dict
from engine.config.base import from_dict
from engine.config.model import ModelConfig
from tests.helpers.torchrun import REPO

CHAT = ADAPTERS["internvl_chat"]

# A published-style InternVL2.5 config.json, shrunk: its auto_map names the publisher's modeling code,
# which an export does not carry; its tiling (max_dynamic_patch 6) is not something our model holds.
SOURCE = {
    "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internvl2_5",
    "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                 "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                 "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
    "select_layer": -1, "downsample_ratio": 0.5, "ps_version": "v2", "force_image_size": 56,
    "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 6,
    "torch_dtype": "bfloat16",
    "vision_config": {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": 64,
                      "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 2, "image_size": 56,
                      "patch_size": 14, "norm_type": "rms_norm", "layer_norm_eps": 1e-6, "qk_normalization": True,
                      "qkv_bias": False, "initializer_factor": 0.1, "hidden_act": "gelu", "num_channels": 3},
    "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 301, "hidden_size": 96,
                   "intermediate_size": 224, "num_hidden_layers": 2, "num_attention_heads": 3, "num_key_value_heads": 1,
                   "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "hidden_act": "silu",
                   "tie_word_embeddings": False, "use_sliding_window": False},
    "img_context_token_id": 299,
}

# Run in a child: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE and the module cache are read at import time.
LOAD = """
import json, sys
from transformers import AutoConfig
out = {}
for d in sys.argv[1:]:
    c = AutoConfig.from_pretrained(d, trust_remote_code=True)
    c.save_pretrained(d + "_resaved")
    again = AutoConfig.from_pretrained(d + "_resaved", trust_remote_code=True)
    out[d] = {"class": type(c).__name__, "vision_class": type(c.vision_config).__name__,
              "llm_class": type(c.llm_config).__name__, "text_config_is_llm": c.get_text_config() is c.llm_config,
              "loaded": c.to_dict(), "resaved": again.to_dict(),
              "resaved_files": sorted(__import__("os").listdir(d + "_resaved"))}
print(json.dumps(out, default=str))
"""


def _export(tmp: Path, name: str, base: dict | None, **changes) -> tuple[Path, dict]:
    src = {**SOURCE, **changes}
    md = CHAT.model_dict(src, tmp)
    check_model_dict(md, "test")
    cfg = CHAT.config_to_hf(from_dict(ModelConfig, md), base if base is None else src)
    out = tmp / name
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    for f, data in CHAT.extra_files(cfg).items():
        (out / f).write_bytes(data)
    return out, cfg


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("chatcfg")
    exports = {
        "internvl": _export(tmp, "internvl", SOURCE),
        "skywork": _export(tmp, "skywork", SOURCE, architectures=["SkyworkR1VChatModel"], model_type="skywork_chat"),
        "from_native": _export(tmp, "from_native", None),  # no base config (e.g. exported from the native layout)
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp / "modules"),
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", LOAD, *(str(p) for p, _ in exports.values())], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k: {"written": cfg, "dir": p, **got[str(p)]} for k, (p, cfg) in exports.items()}


def _differences(written: dict, loaded: dict, where: str = "") -> list[str]:
    """Keys we wrote whose value transformers does not give back (transformers adds keys; fine)."""
    diffs = []
    for k, v in written.items():
        if k == "torch_dtype":  # transformers 5 reads it as `dtype`, which we write too
            continue
        if k == "rope_theta" and where == "llm_config.":  # Qwen2Config 5.x keeps it in rope_parameters only
            v, got = v, (loaded.get("rope_parameters") or {}).get("rope_theta")
        else:
            got = loaded.get(k, "<missing>")
        if isinstance(v, dict) and isinstance(got, dict):
            diffs += _differences(v, got, f"{where}{k}.")
        elif got != v:
            diffs.append(f"{where}{k}: wrote {v!r}, got {got!r}")
    return diffs


@pytest.mark.parametrize("case", ["internvl", "skywork", "from_native"])
def test_autoconfig_loads_export_offline_and_keeps_every_field(loaded, case):
    r = loaded[case]
    want = "SkyworkChatConfig" if case == "skywork" else "InternVLChatConfig"
    assert (r["class"], r["vision_class"], r["llm_class"]) == (want, "InternVisionConfig", "Qwen2Config")
    assert r["text_config_is_llm"]  # what vLLM and transformers look the LLM up by
    assert _differences(r["written"], r["loaded"]) == []
    assert _differences(r["written"], r["resaved"]) == []  # transformers' own save / reload keeps them
    config_code = {f for f in CHAT.extra_files(r["written"]) if f.startswith("configuration_")}
    assert config_code <= set(r["resaved_files"])  # ... and carries our configuration code along


def test_export_names_only_code_it_carries(loaded):
    r = loaded["internvl"]
    assert r["written"]["auto_map"] == {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                                        "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                                        "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"}
    assert sorted(p.name for p in r["dir"].glob("*.py")) == [
        "configuration_intern_vit.py", "configuration_internvl_chat.py", "modeling_intern_vit.py",
        "modeling_internvl_chat.py"]
    for target in r["written"]["auto_map"].values():  # every class it names is in the file it names
        module, cls = target.split(".")
        assert f"class {cls}(" in (r["dir"] / f"{module}.py").read_text()
    sky = loaded["skywork"]["written"]
    assert sky["model_type"] == "skywork_chat"
    assert sky["auto_map"]["AutoConfig"] == "configuration_internvl_chat.SkyworkChatConfig"
    assert sky["auto_map"]["AutoModel"] == "modeling_internvl_chat.SkyworkR1VChatModel"
    assert loaded["from_native"]["written"]["model_type"] == "internvl_chat"


def test_source_tiling_survives_and_defaults_fill_in(loaded):
    assert loaded["internvl"]["written"]["max_dynamic_patch"] == 6  # the source's
    assert loaded["from_native"]["written"]["max_dynamic_patch"] == 12  # InternVL2.5's, with no source config


def test_export_reads_back_as_the_same_model(loaded):
    a = CHAT.model_dict(SOURCE, Path("."))
    b = CHAT.model_dict(loaded["internvl"]["written"], Path("."))
    assert a == b


def _tokenizer(d: Path, tokens: dict[str, int]) -> None:
    added = [{"id": i, "content": t, "special": True} for t, i in tokens.items()]
    (d / "tokenizer.json").write_text(json.dumps({"added_tokens": added, "model": {"vocab": {}}}))


def test_export_notes_name_what_vllm_needs_from_the_tokenizer(tmp_path):
    cfg = {"img_context_token_id": 299}
    assert "has no tokenizer" in CHAT.export_notes(tmp_path, cfg)[0]
    _tokenizer(tmp_path, {"<IMG_CONTEXT>": 299})
    (note,) = CHAT.export_notes(tmp_path, cfg)
    assert "does not declare <img>, </img>" in note
    _tokenizer(tmp_path, {"<img>": 297, "</img>": 298, "<IMG_CONTEXT>": 300})
    (note,) = CHAT.export_notes(tmp_path, cfg)
    assert "id 300 in the tokenizer" in note and "img_context_token_id is 299" in note
    _tokenizer(tmp_path, {"<img>": 297, "</img>": 298, "<IMG_CONTEXT>": 299})
    assert CHAT.export_notes(tmp_path, cfg) == []
