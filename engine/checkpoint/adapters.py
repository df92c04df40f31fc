"""One adapter per HF layout: `from_hf` / `to_hf` for tensors and for config.json.

The adapters differ only in data (which parts they hold, each part's key prefix and naming style from
`keymap`) and in their config.json spelling; the tensor mapping is the shared `keymap` table.

    layout          parts                   HF class / vLLM architecture
    internvl        vision, projector, llm  InternVLForConditionalGeneration (transformers-native)
    internvl_chat   vision, projector, llm  InternVLChatModel / SkyworkR1VChatModel (remote-code layout)
    qwen2           llm                     Qwen2ForCausalLM
    internvit       vision                  InternVisionModel (InternViT-only checkpoints)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.checkpoint import hf_config as hc
from engine.checkpoint import hf_remote_code
from engine.checkpoint.hf_io import CheckpointError
from engine.checkpoint.keymap import Mapping, fuse, mappings, num_layers, split
from engine.config.base import ConfigError, deep_merge
from engine.config.model import ModelConfig

IMG_CONTEXT = "<IMG_CONTEXT>"
# vLLM's InternVL-chat processor writes an image as <img> + <IMG_CONTEXT> x tokens + </img> (by token string)
CHAT_IMAGE_TOKENS = ("<img>", "</img>", IMG_CONTEXT)


@dataclass(frozen=True)
class Group:
    """A unit of streaming: one layer of a part, or one of a part's non-layer tensors (the embedding
    and the output layer are each as big as several layers, so they travel alone)."""

    part: str
    layer: int | None
    maps: tuple[Mapping, ...]

    @property
    def name(self) -> str:
        return f"{self.part}" + (f".layer{self.layer}" if self.layer is not None else f".{self.maps[0].ours}")


class Adapter:
    name = ""
    architectures: tuple[str, ...] = ()
    parts: dict[str, tuple[str, str]] = {}  # part -> (HF key prefix, keymap style)

    # -- tensors ---------------------------------------------------------------------------------------
    def groups(self, mcfg: ModelConfig, parts=None) -> list[Group]:
        out = []
        for part in parts or self.parts:
            prefix, style = self.parts[part]
            out.extend(Group(part, None, (m,)) for m in mappings(part, prefix, style, mcfg, None))
            for i in range(num_layers(part, mcfg)):
                out.append(Group(part, i, tuple(mappings(part, prefix, style, mcfg, i))))
        return out

    def from_hf(self, read, mcfg: ModelConfig, group: Group) -> dict[str, torch.Tensor]:
        """read(hf_name, needed_for) -> tensor. Returns our full tensors of the group."""
        return {m.ours: fuse(m.fuse, [read(n, m.ours) for n in m.hf], mcfg) for m in group.maps}

    def to_hf(self, ours: dict[str, torch.Tensor], mcfg: ModelConfig, group: Group) -> dict[str, torch.Tensor]:
        out = {}
        for m in group.maps:
            if m.ours not in ours:
                raise CheckpointError(f"no tensor for '{m.ours}' (group {group.name}); the checkpoint is incomplete")
            out.update(zip(m.hf, split(m.fuse, ours[m.ours], mcfg)))
        return out

    # -- config ----------------------------------------------------------------------------------------
    def model_dict(self, hf_cfg: dict, hf_dir: Path) -> dict:
        """config.json -> a (partial) ModelConfig mapping for the parts this layout holds."""
        raise NotImplementedError

    def config_to_hf(self, mcfg: ModelConfig, base: dict | None = None) -> dict:
        raise NotImplementedError

    def _finish(self, cfg: dict, base: dict | None) -> dict:
        """Keys we don't model (chat template name, eos ids...) survive from the original config."""
        return deep_merge(base, cfg) if base else cfg

    # -- files beside the weights ----------------------------------------------------------------------
    def extra_files(self, hf_cfg: dict) -> dict[str, bytes]:
        """Files an export needs besides weights, config.json and the tokenizer (name -> content)."""
        return {}

    def export_notes(self, out: Path, hf_cfg: dict) -> list[str]:
        """What keeps a finished export from being served (e.g. tokens the serving processor needs)."""
        return []


def tokenizer_token_id(hf_dir: Path, token: str) -> int | None:
    tok = hf_dir / "tokenizer.json"
    if tok.is_file():
        for added in json.loads(tok.read_text()).get("added_tokens", []):
            if added.get("content") == token:
                return int(added["id"])
        vocab = json.loads(tok.read_text()).get("model", {}).get("vocab", {})
        if isinstance(vocab, dict) and token in vocab:
            return int(vocab[token])
    tc = hf_dir / "tokenizer_config.json"
    if tc.is_file():
        for tid, entry in json.loads(tc.read_text()).get("added_tokens_decoder", {}).items():
            if entry.get("content") == token:
                return int(tid)
    return None


def _projector(ratio: float) -> dict:
    return {"downsample_ratio": float(ratio)}


class InternVLAdapter(Adapter):
    name = "internvl"
    architectures = ("InternVLForConditionalGeneration",)
    parts = {"vision": ("vision_tower.", "native"), "projector": ("multi_modal_projector.", "native"),
             "llm": ("language_model.", "hf")}

    def model_dict(self, c: dict, hf_dir: Path) -> dict:
        where = f"{hf_dir}/config.json"
        c = hc.with_defaults(c, hc.INTERNVL_DEFAULTS)
        hc._need(c["vision_feature_select_strategy"] == "default", where,
                 "vision_feature_select_strategy must be 'default' (CLS dropped)")
        hc._need(c["projector_hidden_act"] == "gelu", where, "projector_hidden_act must be gelu")
        text = c["text_config"]
        llm = hc.llm_from_hf(text, where + " text_config")
        # transformers' InternVLConfig decides the tying itself (default: tied), whatever text_config says
        llm["tie_embeddings"] = bool(c["tie_word_embeddings"])
        vision = hc.vision_from_native(c["vision_config"], where + " vision_config")
        vision["select_layer"] = hc._select_from_hf(c["vision_feature_layer"], where)
        return {"vision": vision, "projector": _projector(c["downsample_ratio"]), "llm": llm,
                "image_token_id": c["image_token_id"], "params_dtype": hc.hf_dtype(c) or "float32"}

    def config_to_hf(self, m: ModelConfig, base: dict | None = None) -> dict:
        n_layers, feature_layer = hc.vision_select_layer(m)
        text = hc.llm_to_hf(m)
        text.pop("architectures")
        cfg = {
            "architectures": list(self.architectures), "model_type": "internvl",
            "downsample_ratio": m.projector.downsample_ratio, "image_token_id": m.image_token_id,
            "image_seq_length": m.tokens_per_tile, "projector_hidden_act": "gelu",
            "vision_feature_layer": feature_layer, "vision_feature_select_strategy": "default",
            "tie_word_embeddings": m.llm.tie_embeddings, "dtype": m.params_dtype,
            "text_config": text, "vision_config": hc.vision_to_native(m, n_layers),
        }
        return self._finish(cfg, base)


class InternVLChatAdapter(Adapter):
    name = "internvl_chat"
    architectures = ("InternVLChatModel",)
    parts = {"vision": ("vision_model.", "chat"), "projector": ("mlp1.", "chat"), "llm": ("language_model.", "hf")}

    def model_dict(self, c: dict, hf_dir: Path) -> dict:
        """config.json read as InternVLChatConfig / SkyworkChatConfig read it (hf_config.INTERNVL_CHAT_DEFAULTS)."""
        where = f"{hf_dir}/config.json"
        c = hc.with_defaults(c, hc.INTERNVL_CHAT_DEFAULTS)
        hc._need(c["ps_version"] == "v2", where, f"ps_version={c['ps_version']!r} (InternVL's default is v1 when the "
                                                 "key is missing); only v2 pixel shuffle is supported")
        for key in ("use_backbone_lora", "use_llm_lora"):
            hc._need(not c[key], where, f"{key}={c[key]}: the weights are LoRA-wrapped; merge the LoRA weights into "
                                        "the base model and save it without LoRA first")
        llm_c = c["llm_config"]
        archs = llm_c.get("architectures")
        hc._need(bool(archs), where, "llm_config has no architectures (InternVLChatConfig needs it to choose the "
                                     "LLM class); add \"architectures\": [\"Qwen2ForCausalLM\"]")
        hc._need(archs[0] == "Qwen2ForCausalLM", where, f"llm_config architecture {archs[0]} is not supported (Qwen2 only)")
        llm = hc.llm_from_hf(llm_c, where + " llm_config")
        llm["tie_embeddings"] = bool(llm_c.get("tie_word_embeddings", hc.QWEN2_DEFAULTS["tie_word_embeddings"]))
        vision = hc.vision_from_chat(c["vision_config"], where + " vision_config")
        forced = c["force_image_size"]
        # InternVLChatModel sizes its tiles by force_image_size and bicubic-resizes the ViT's position table to
        # it; our encoder's table is the checkpoint's, for its own image_size
        hc._need(not forced or forced == vision["image_size"], where,
                 f"force_image_size={forced} differs from vision_config.image_size={vision['image_size']}; not "
                 "supported (the position embeddings would be resized at every forward)")
        vision["select_layer"] = hc._select_from_hf(c["select_layer"], where)
        image_token_id = c.get("img_context_token_id")
        if image_token_id is None:
            image_token_id = tokenizer_token_id(hf_dir, IMG_CONTEXT)
        if image_token_id is None:
            raise CheckpointError(
                f"{hf_dir}: cannot find the id of {IMG_CONTEXT}: config.json has no img_context_token_id and the "
                "tokenizer files do not declare the token; pass --image-token-id"
            )
        dtype = hc.hf_dtype(c) or hc.hf_dtype(llm_c) or "float32"
        return {"vision": vision, "projector": _projector(c["downsample_ratio"]), "llm": llm,
                "image_token_id": int(image_token_id), "params_dtype": dtype}

    # Image tiling, which our model does not hold: the source checkpoint's values win, else InternVL2.5's.
    PREPROCESS = {"template": "internvl2_5", "dynamic_image_size": True, "use_thumbnail": True,
                  "min_dynamic_patch": 1, "max_dynamic_patch": 12}

    def config_to_hf(self, m: ModelConfig, base: dict | None = None) -> dict:
        base = base or {}
        n_layers, feature_layer = hc.vision_select_layer(m)
        archs = list(base.get("architectures") or self.architectures)
        # the config class is ours (hf_remote_code); a model_type we have no class for becomes InternVL's
        model_type = base.get("model_type") if base.get("model_type") in hf_remote_code.AUTO_MAP else \
            "skywork_chat" if archs[0] == "SkyworkR1VChatModel" else "internvl_chat"
        cfg = {
            "architectures": archs, "model_type": model_type,
            "vision_config": hc.vision_to_chat(m, n_layers), "llm_config": hc.llm_to_hf(m),
            "select_layer": feature_layer, "downsample_ratio": m.projector.downsample_ratio, "ps_version": "v2",
            "force_image_size": m.vision.image_size, **{k: base.get(k, v) for k, v in self.PREPROCESS.items()},
            "img_context_token_id": m.image_token_id, "tie_word_embeddings": m.llm.tie_embeddings,
            "use_backbone_lora": 0, "use_llm_lora": 0, "dtype": m.params_dtype, "torch_dtype": m.params_dtype,
        }
        out = self._finish(cfg, base)
        # replaces the source's auto_map: it names the publisher's files; the export carries ours
        out["auto_map"] = dict(hf_remote_code.AUTO_MAP[model_type])
        return out

    def extra_files(self, hf_cfg: dict) -> dict[str, bytes]:
        """Our configuration and modeling code, so that `trust_remote_code=True` loads the export offline
        (AutoConfig / AutoModel in transformers; vLLM reads the configuration and brings its own model)."""
        return {name: (hf_remote_code.DIR / name).read_bytes() for name in hf_remote_code.FILES}

    def export_notes(self, out: Path, hf_cfg: dict) -> list[str]:
        if not (out / "tokenizer.json").is_file() and not (out / "tokenizer_config.json").is_file():
            return [f"{out} has no tokenizer (the checkpoint records none); copy the LLM's tokenizer files next to "
                    f"it before serving it (vLLM needs {', '.join(CHAT_IMAGE_TOKENS)} in it)"]
        ids = {t: tokenizer_token_id(out, t) for t in CHAT_IMAGE_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            return [f"the tokenizer in {out} does not declare {', '.join(missing)}; vLLM's InternVL processor spells "
                    "an image as <img> <IMG_CONTEXT>... </img> and cannot serve images without them"]
        if ids[IMG_CONTEXT] != hf_cfg.get("img_context_token_id"):
            return [f"{IMG_CONTEXT} is id {ids[IMG_CONTEXT]} in the tokenizer in {out} but img_context_token_id is "
                    f"{hf_cfg.get('img_context_token_id')} in its config.json; vLLM takes the tokenizer's"]
        return []


class Qwen2Adapter(Adapter):
    name = "qwen2"
    architectures = ("Qwen2ForCausalLM",)
    parts = {"llm": ("", "hf")}

    def model_dict(self, c: dict, hf_dir: Path) -> dict:
        llm = hc.llm_from_hf(c, f"{hf_dir}/config.json")
        llm["tie_embeddings"] = bool(c.get("tie_word_embeddings", False))
        token = tokenizer_token_id(hf_dir, IMG_CONTEXT)
        out = {"llm": llm, "text_only": True, "params_dtype": hc.hf_dtype(c) or "float32",
               # text-only: the image token is never used; any in-vocabulary id keeps the config valid
               "image_token_id": token if token is not None else 0}
        return out

    def config_to_hf(self, m: ModelConfig, base: dict | None = None) -> dict:
        return self._finish(hc.llm_to_hf(m), base)


class InternViTAdapter(Adapter):
    name = "internvit"
    architectures = ("InternVisionModel",)
    parts = {"vision": ("", "chat")}

    def model_dict(self, c: dict, hf_dir: Path) -> dict:
        return {"vision": hc.vision_from_chat(c, f"{hf_dir}/config.json"), "params_dtype": hc.hf_dtype(c) or "float32"}

    def config_to_hf(self, m: ModelConfig, base: dict | None = None) -> dict:
        n_layers, _ = hc.vision_select_layer(m)
        return self._finish(hc.vision_to_chat(m, n_layers), base)


ADAPTERS = {a.name: a for a in (InternVLAdapter(), InternVLChatAdapter(), Qwen2Adapter(), InternViTAdapter())}

_BY_ARCH = {
    "InternVLForConditionalGeneration": "internvl", "InternVLChatModel": "internvl_chat",
    "SkyworkR1VChatModel": "internvl_chat", "Qwen2ForCausalLM": "qwen2", "InternVisionModel": "internvit",
}
_BY_TYPE = {"internvl": "internvl", "internvl_chat": "internvl_chat", "skywork_chat": "internvl_chat",
            "qwen2": "qwen2", "intern_vit_6b": "internvit"}


def detect_layout(hf_cfg: dict, where: str = "config.json") -> Adapter:
    for arch in hf_cfg.get("architectures") or []:
        if arch in _BY_ARCH:
            return ADAPTERS[_BY_ARCH[arch]]
    if hf_cfg.get("model_type") in _BY_TYPE:
        return ADAPTERS[_BY_TYPE[hf_cfg["model_type"]]]
    raise CheckpointError(
        f"{where}: architectures={hf_cfg.get('architectures')} / model_type={hf_cfg.get('model_type')!r} is not a "
        f"layout we convert; supported: {sorted(_BY_ARCH)}"
    )


def check_model_dict(d: dict, where: str) -> None:
    """Early, readable failure for a config our ModelConfig refuses."""
    from engine.config.base import from_dict

    try:
        from_dict(ModelConfig, d)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
