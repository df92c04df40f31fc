"""The small shipped BPE tokenizer (assets/tiny_tokenizer): HF `tokenizers`, byte-level, ~2000 tokens,
trained on the generated visual-reasoning set, with the chat/image/think special tokens.
Saved as tokenizer.json + tokenizer_config.json so `AutoTokenizer.from_pretrained(dir)` loads it offline."""

from __future__ import annotations

import json
from pathlib import Path

from engine.data.template import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START, PAD, THINK_END, THINK_START

# Order fixes the ids 0..5; <think>/</think> follow as plain added tokens (kept when decoding with
# skip_special_tokens, as in Qwen, so reward parsers still see the trace boundaries).
SPECIAL = [PAD, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT]
ADDED = [THINK_START, THINK_END]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def train_tiny_tokenizer(texts: list[str], out_dir: str | Path, vocab_size: int = 2000) -> Path:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown token needed
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IMG_START, IMG_END, IMG_CONTEXT],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    # transformers 5 writes its new class name; the 4.x name loads in both major versions
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return out
