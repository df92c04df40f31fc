"""Code written next to an InternVL-chat / Skywork-R1V export (`--layout internvl_chat`).

Those checkpoints' classes are not in transformers: a published checkpoint ships its own `configuration_*.py`
and `modeling_*.py` and names them in config.json's `auto_map`, and transformers / vLLM load it with
`trust_remote_code=True`. The files here are our own equivalents -- the published parameter names, config
fields, defaults and math, not their code -- copied verbatim into the exported directory so that it loads
offline with `AutoConfig` / `AutoModel`. They import nothing from this engine (torch and transformers only).

Only `FILES` are copied, never this `__init__`.
"""

from pathlib import Path

DIR = Path(__file__).resolve().parent

FILES = ("configuration_internvl_chat.py", "configuration_intern_vit.py", "modeling_internvl_chat.py",
         "modeling_intern_vit.py")  # what an export carries
# model_type -> config.json's `auto_map` (the classes, by module.Class)
AUTO_MAP = {
    "internvl_chat": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                      "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                      "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
    "skywork_chat": {"AutoConfig": "configuration_internvl_chat.SkyworkChatConfig",
                     "AutoModel": "modeling_internvl_chat.SkyworkR1VChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.SkyworkR1VChatModel"},
}
