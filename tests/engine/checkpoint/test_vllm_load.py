"""vLLM loads what mcore-to-hf writes, with an image, offline, and agrees with transformers:
the transformers-native layout, and the InternVL-chat layout as InternVLChatModel and SkyworkR1VChatModel
(through the configuration code the export carries)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.torchrun import REPO, free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed")]


def _worker(mode: str, root: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("vllm_worker.py")), mode, str(root)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])


def test_vllm_generates_like_transformers_from_exported_internvl(tmp_path):
    r = _worker("native", tmp_path)
    assert len(r["transformers_on_source"]) == 8 and r["image_effect_on_logits"] > 1e-3, r
    assert r["vllm_on_export"] == r["transformers_on_source"], r


def test_vllm_generates_like_transformers_from_exported_internvl_chat(tmp_path):
    r = _worker("chat", tmp_path)
    assert len(r["transformers_on_source"]) == 8 and r["image_effect_on_logits"] > 1e-3, r
    for name, arch, config_class in (("internvl_chat", "InternVLChatModel", "InternVLChatConfig"),
                                     ("skywork", "SkyworkR1VChatModel", "SkyworkChatConfig")):
        v = r[f"{name}/vllm"]
        assert (v["architecture"], v["hf_config_class"]) == (arch, config_class), (name, v)
        assert r[f"{name}/notes"] == [], (name, r[f"{name}/notes"])  # the tokenizer has what vLLM needs
        assert r[f"{name}/files"] == ["configuration_intern_vit.py", "configuration_internvl_chat.py",
                                      "modeling_intern_vit.py", "modeling_internvl_chat.py"], r  # our own code (vLLM: its model)
        assert v["prompt_ids"] == r["reference_prompt_ids"], (name, v)  # <img> <IMG_CONTEXT> x 4 </img>
        assert v["tokens"] == r["transformers_on_source"], (name, v)
