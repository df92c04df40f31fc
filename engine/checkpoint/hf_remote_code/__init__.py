"""Configuration code written next to an InternVL-chat / Skywork-R1V export (`--layout internvl_chat`).

Those checkpoints' config classes are not in transformers: a published checkpoint ships its own
`configuration_*.py` and names them in config.json's `auto_map`, and transformers / vLLM load it with
`trust_remote_code=True`. The files here are our own small equivalents (configuration only: vLLM has
its own model implementation, and transformers users take the `internvl` layout), copied verbatim into
the exported directory so that it loads offline. They import nothing from this engine.

Only `FILES` are copied, never this `__init__`.
"""

from pathlib import Path

DIR = Path(__file__).resolve().parent

FILES = ("configuration_internvl_chat.py", "configuration_intern_vit.py")  # what an export carries
# model_type -> the AutoConfig class, as config.json's `auto_map` names it
CONFIG_CLASSES = {
    "internvl_chat": "configuration_internvl_chat.InternVLChatConfig",
    "skywork_chat": "configuration_internvl_chat.SkyworkChatConfig",
}
