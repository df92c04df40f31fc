"""TP / PP / TP x PP give the same losses, logits and gradients as TP=1, PP=1 (real gloo processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers.torchrun import torchrun

WORKER = Path(__file__).with_name("dist_worker.py")
pytestmark = pytest.mark.slow


def merged(out: Path) -> dict:
    """Merge the per-stage files of one run into full tensors."""
    result = {"grads": {}}
    for f in sorted(out.glob("rank*.pt")):
        d = torch.load(f, weights_only=False)
        result["grads"].update(d["grads"])
        for k in ("loss", "per_token_loss", "logits"):
            if k in d:
                result[k] = d[k]
    return result


def max_differences(ref: dict, got: dict) -> dict:
    assert set(ref["grads"]) == set(got["grads"]), set(ref["grads"]) ^ set(got["grads"])
    diffs = {
        "loss": abs(ref["loss"] - got["loss"]),
        "per_token_loss": (ref["per_token_loss"] - got["per_token_loss"]).abs().max().item(),
        "grads": max((ref["grads"][k] - got["grads"][k]).abs().max().item() for k in ref["grads"]),
    }
    if "logits" in got:
        diffs["logits"] = (ref["logits"] - got["logits"]).abs().max().item()
    return diffs


def assert_equivalent(ref: dict, got: dict) -> None:
    d = max_differences(ref, got)
    # fp32, same math in a different order (TP all-reduces, split GEMMs): rounding only.
    assert d["loss"] < 1e-5 and d["per_token_loss"] < 1e-5, d
    assert d["grads"] < 1e-6, d
    if "logits" in d:
        assert d["logits"] < 1e-5, d


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("tp1pp1")
    torchrun(WORKER, ["--mode", "reference", "--out", str(out)], nproc=1)
    return out / "init.pt", merged(out)


@pytest.mark.parametrize(
    "tp,pp,loss_impl",
    [(2, 1, "reference"), (1, 2, "reference"), (2, 2, "reference"), (2, 1, "fused"), (2, 1, "fused_linear"),
     (2, 2, "fused_linear")],
    ids=["tp2", "pp2", "tp2xpp2", "tp2-fused-triton-loss", "tp2-fused-linear-loss", "tp2xpp2-fused-linear-loss"],
)
def test_layout_matches_tp1_pp1(reference, tmp_path, tp, pp, loss_impl):
    """The reference run uses megatron's vocab-parallel cross entropy; the fused run the Triton kernel (dlogits
    in place); the fused_linear run the output layer fused into the loss (the model returns hidden states)."""
    init, ref = reference
    torchrun(WORKER, ["--mode", "compare", "--tp", str(tp), "--pp", str(pp), "--init", str(init), "--out", str(tmp_path),
                      "--loss-impl", loss_impl], nproc=tp * pp)
    got = merged(tmp_path)
    # every parameter of the model has a gradient to compare, image rows and text-only rows both ran
    assert len(got["grads"]) == len(ref["grads"]) > 60
    assert_equivalent(ref, got)


def test_wrong_weight_layout_is_detected(reference, tmp_path):
    """Loading SwiGLU's fc1 with a plain split (a classic conversion bug) must fail the comparison."""
    init, ref = reference
    torchrun(WORKER, ["--mode", "compare", "--tp", "2", "--wrong-layout", "--init", str(init), "--out", str(tmp_path)], nproc=2)
    with pytest.raises(AssertionError):
        assert_equivalent(ref, merged(tmp_path))


def test_freezing_configurations_train_only_their_modules(tmp_path):
    torchrun(WORKER, ["--mode", "freeze", "--tp", "2", "--out", str(tmp_path)], nproc=2)
    expected_trainable = {
        "adapter_only": {"projector"},
        "llm_adapter": {"projector", "llm"},
        "adapter_vit": {"projector", "vision"},
    }
    for rank_file in sorted(tmp_path.glob("freeze_rank*.pt")):
        report = torch.load(rank_file)
        for case, moved in report.items():
            for name, changed in moved.items():
                module = name.split(".")[0]
                if module in expected_trainable[case]:
                    assert changed, f"{case}: trainable parameter {name} did not move"
                else:
                    assert not changed, f"{case}: frozen parameter {name} changed"


def test_sequence_parallel_matches_tp1_pp1(reference, tmp_path):
    """TP=2 with sequence parallel (LocalNorm marked for SP, image merge before the scatter, ViT unsplit) and
    packed THD rows gives the TP=1 losses, logits and gradients."""
    init, ref = reference
    torchrun(WORKER, ["--mode", "compare", "--tp", "2", "--init", str(init), "--out", str(tmp_path),
                      "--override", "parallel.sequence_parallel=true"], nproc=2)
    assert_equivalent(ref, merged(tmp_path))


def test_virtual_pipeline_stages_match_tp1_pp1(reference, tmp_path):
    """PP=2 x 2 virtual stages (interleaved 1F1B): rank r holds layer chunks r and r + 2; same losses and gradients."""
    init, ref = reference
    torchrun(WORKER, ["--mode", "compare", "--pp", "2", "--init", str(init), "--out", str(tmp_path),
                      "--override", "parallel.virtual_pipeline_model_parallel_size=2"], nproc=2)
    layers = {int(f.stem[4:]): torch.load(f, weights_only=False)["layers"] for f in tmp_path.glob("rank*.pt")}
    assert layers == {0: [[1], [3]], 1: [[2], [4]]}
    assert_equivalent(ref, merged(tmp_path))


def test_overlapped_grad_reduce_at_dp2_matches_tp1_pp1(reference, tmp_path):
    """DP=2 (both ranks see the same micro-batches, so the DP mean is the single-rank gradient) with the gradient
    all-reduce overlapped with backward (megatron DDP buckets started by backward hooks). Plain DDP, so every rank
    holds the whole reduced gradient (the distributed optimizer's reduce-scatter leaves only its shard reduced)."""
    init, ref = reference
    torchrun(WORKER, ["--mode", "compare", "--init", str(init), "--out", str(tmp_path), "--override",
                      "performance.overlap_grad_reduce=true", "--override", "parallel.use_distributed_optimizer=false"],
             nproc=2)
    assert_equivalent(ref, merged(tmp_path))
