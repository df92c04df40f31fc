"""HF <-> megatron conversion proven by logits against transformers (fp32), on tiny random models.

Three child runs (their start-up dominates, so each batches many checks; see ckpt_worker.py):
  single   one process: fixtures, TP=1 conversions, round trips, cross-layout, assembly, errors
  dist     torchrun, 2 ranks (gloo): TP=2 / PP=2 parity, checkpoints written at TP=2 / PP=2 and read
           back at the other layout
  export   one process: mcore-to-hf of the TP=2 / PP=2 written checkpoints, compared bit for bit
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.torchrun import REPO, free_port, torchrun

HERE = Path(__file__).resolve().parent
WORKER = HERE / "ckpt_worker.py"
TOL = 1e-4  # the fp32 bound on max |delta logit|

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


def _offline(root: Path) -> dict:
    """Remote code (the chat exports' modeling files) is copied into a module cache of the test's own."""
    return {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_MODULES_CACHE": str(root / "hf_modules")}


@pytest.fixture(scope="module")
def single(root) -> dict:
    env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(free_port()), **_offline(root)}
    proc = subprocess.run([sys.executable, str(WORKER), "single", str(root)], cwd=REPO, capture_output=True,
                          text=True, timeout=240, env={**os.environ, **env})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((root / "results_single.json").read_text())


@pytest.fixture(scope="module")
def dist(root, single) -> dict:
    torchrun(WORKER, ["dist", str(root)], nproc=2, timeout=240)
    return json.loads((root / "results_dist.json").read_text())


def _assert_parity(r: dict) -> None:
    assert r["max_abs_logit_diff"] <= TOL, r
    assert r["greedy_agreement"] == 1.0, r
    assert r["mean_kl"] < 1e-9, r  # fp32 logits equal to ~1e-6 give KL ~1e-14


@pytest.mark.parametrize("case", ["nat_gqa", "nat_tied", "nat_select", "chat_gqa", "sky_tied", "qwen_a", "qwen_tied"])
def test_hf_to_mcore_tp1_matches_transformers(single, case):
    _assert_parity(single[f"parity/{case}/tp1"])


@pytest.mark.parametrize("case", ["nat_gqa", "nat_tied", "chat_gqa", "sky_tied", "qwen_a", "qwen_tied", "qwen_bf16"])
def test_round_trip_is_bit_identical(single, case):
    r = single[f"roundtrip/{case}"]
    assert r["same_keys"] and not r["differing"] and r["n"] > 20, r


def test_chat_vision_config_without_qk_normalization_is_read_as_internvl_reads_it(single):
    # converted from a chat checkpoint whose vision_config leaves out qk_normalization and norm_type, compared
    # with transformers on the original native checkpoint (explicit use_qk_norm=true, norm_type=rms_norm)
    _assert_parity(single["parity/sky_nokey_vs_native_source"])


def test_dynamic_ntk_rope_converts_and_exports(single):
    _assert_parity(single["parity/qwen_dyn/tp1"])
    r = single["roundtrip/qwen_dyn"]
    assert r["same_keys"] and not r["differing"], r
    assert single["rope/exported_parameters"] == {"rope_theta": 10000.0, "rope_type": "dynamic", "type": "dynamic",
                                                  "factor": 2.0}


def test_dynamic_ntk_differs_from_plain_rope_only_past_max_position_embeddings(single):
    # why train.seq_length / rollout.max_model_len stay <= max_position_embeddings under rope_scaling=dynamic
    _assert_parity(single["rope/plain_past_max_pos"])
    assert single["rope/dynamic_past_max_pos"]["max_abs_logit_diff"] > 1e-3, single["rope/dynamic_past_max_pos"]


def test_bf16_is_preserved(single):
    assert single["dtype/qwen_bf16"] == ["torch.bfloat16"]


@pytest.mark.parametrize("case", ["nat_gqa", "nat_tied", "nat_select", "qwen_a", "qwen_tied"])
def test_export_loads_with_from_pretrained_and_reproduces_logits(single, case):
    r = single[f"from_pretrained/{case}"]
    assert r["max_abs_logit_diff"] == 0.0 and r["greedy_agreement"] == 1.0, r


def test_select_layer_export_is_truncated_encoder(single):
    # 3 blocks, features of block -2: the export carries the 2 used blocks and reads the last one
    assert single["select/export_config"] == [2, -1]
    assert single["select/extra_block_dropped"]


@pytest.mark.parametrize("key", ["cross/chat_to_native", "cross/native_to_chat", "cross/vlm_llm_to_qwen2"])
def test_cross_layout_exports_are_bit_identical(single, key):
    r = single[key]
    assert r["same_keys"] and not r["differing"], r


@pytest.mark.parametrize("case", ["chat_gqa", "sky_tied", "native_as_chat", "select"])
def test_chat_export_loads_with_automodel_and_its_logits_equal_ours(single, case):
    # AutoModel.from_pretrained(export, trust_remote_code=True) runs the modeling code the export carries
    r = single[f"remote_code/{case}"]
    _assert_parity(r)
    assert r["reference"] == "remote_code" and r["layout"] == "internvl_chat"


def test_chat_export_model_classes_and_generate(single):
    assert single["remote_code/class"] == "SkyworkR1VChatModel"
    g = single["remote_code/generate"]
    assert g["remote_code"] == g["transformers"] and len(g["remote_code"][0]) == 5, g


def test_native_exported_as_chat_layout_matches_transformers(single):
    _assert_parity(single["cross/native_to_chat_parity"])


def test_reassembly_takes_each_part_from_its_source(single):
    for part in ("vision", "connector", "llm"):
        r = single[f"assemble/{part}"]
        assert r["same_keys"] and not r["differing"] and r["n"] > 0, (part, r)
    assert single["assemble/vit_only_layout"] == "internvit"  # vision came from an InternViT-only checkpoint
    assert single["assemble/image_token_id"] == 331  # the LLM tokenizer's <IMG_CONTEXT>
    _assert_parity(single["assemble/parity"])  # the assembled VLM runs, and transformers agrees


def test_reassembly_reports_tokenizer_mismatch(single):
    notes = " | ".join(single["assemble/notes"])
    assert "tokenizer mismatch" in notes and "vocab size mismatch: connector source" in notes
    assert "<IMG_CONTEXT> id differs: 299" in notes
    assert "no <IMG_CONTEXT> token" in single["assemble/no_img_token"]
    assert "--connector init" in single["assemble/connector_misfit"]


def test_training_loop_save_round_trips(single):
    assert single["resave/step"] == 7
    _assert_parity(single["resave/parity"])


def test_trainer_checkpoints_interoperate(single):
    assert single["trainer/init_from_converted_step"] == 0  # train.init_from accepts a converted checkpoint
    r = single["trainer/export_of_training_checkpoint"]  # mcore-to-hf reads a training checkpoint
    assert r["same_keys"] and not r["differing"], r


def test_piece_writer_stores_what_megatron_save_stores(single):
    r = single["lazy/equals_megatron_save"]
    assert r["same_keys"] and not r["differing"] and r["n"] > 40, r
    assert r["files"] == ["__0_0.distcp"], r  # one process, one file


def test_small_pieces_store_the_same_checkpoint(single):
    r = single["lazy/small_pieces"]
    assert r["same_keys"] and not r["differing"], r
    assert r["pieces"] > 10 * single["lazy/stored_keys"], r  # really written in many row ranges
    # fused kinds are written whole: the largest is the ViT's q/k/v interleave, 192 x 64 fp32
    assert r["largest_piece_bytes"] == 3 * 64 * 64 * 4, r


def test_config_mismatch_is_a_clear_error(single):
    msg = single["error/config_mismatch"]
    assert msg.startswith("CheckpointError") and "model.llm.num_layers: checkpoint 2, config 4" in msg


def test_damaged_checkpoints_are_clear_errors(single):
    assert "shard file __0_0.distcp" in single["error/missing_distcp"] and "does not exist" in single["error/missing_distcp"]
    assert single["error/missing_distcp_no_output"]
    for key in ("error/truncated_safetensors", "error/corrupt_header"):
        assert "model.safetensors: cannot open as safetensors" in single[key] and "re-download" in single[key]
    assert single["error/no_partial_left"]


@pytest.mark.parametrize("key", [
    "parity/nat_gqa/tp2_from_hf", "parity/chat_gqa/tp2_from_tp1_ckpt", "parity/qwen_a/tp2_from_tp1_ckpt",
    "parity/nat_tied/pp2_from_hf", "parity/sky_tied/pp2_from_tp1_ckpt",
    "parity/nat_tied/tp2pp1_written_and_read", "parity/nat_tied/written_tp2pp1_read_tp1pp2",
    "parity/chat_gqa/tp1pp2_written_and_read", "parity/chat_gqa/written_tp1pp2_read_tp2pp1",
    "parity/qwen_tied/tp1pp2_written_and_read", "parity/qwen_tied/written_tp1pp2_read_tp2pp1",
    "parity/nat_pad/tp2pp1_written_and_read", "parity/nat_pad/written_tp2pp1_read_tp1pp2",
    # a TP=1 conversion has no ViT head padding; TP=2 needs it: re-padded at load (converter and trainer paths)
    "parity/nat_pad/tp2_from_unpadded_tp1_ckpt", "parity/nat_pad/tp2_init_from_unpadded_tp1_ckpt",
])
def test_tp2_pp2_match_transformers(dist, key):
    _assert_parity(dist[key])


def test_one_process_writes_the_tp2_checkpoint_two_processes_write(dist):
    r = dist["lazy/tp2_one_vs_two_processes"]
    assert r["same_keys"] and not r["differing"] and r["n"] > 40, r
    assert r["files"] == ["__0_0.distcp", "__1_0.distcp"], r  # each process wrote its share


@pytest.fixture(scope="module")
def exported(root, dist) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), **_offline(root)}
    proc = subprocess.run([sys.executable, str(WORKER), "export", str(root)], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads((root / "results_export.json").read_text())


@pytest.mark.parametrize("ckpt", ["nat_tied_tp2pp1", "chat_gqa_tp1pp2", "qwen_tied_tp1pp2", "nat_pad_tp2pp1"])
def test_checkpoints_written_at_tp2_pp2_export_bit_identically(exported, ckpt):
    r = exported[ckpt]
    assert r["same_keys"] and not r["differing"] and r["n"] > 20, r


def test_chat_export_of_a_head_padded_tp2_checkpoint_runs_through_its_own_code(exported):
    _assert_parity(exported["remote_code/nat_pad_tp2"])


def test_vit_padding_is_dropped_at_load_only_when_it_is_padding(exported):
    assert exported["vit_pad/written_padding"] == 8
    _assert_parity(exported["parity/nat_pad/tp1_unpadded_from_padded_tp2_ckpt"])
    msg = exported["error/nonzero_padding"]
    assert msg.startswith("CheckpointError") and "padding heads of 'vision.layers.0.attn.linear_qkv.weight'" in msg
    assert "are not zero" in msg
