"""Training engine for vision-language reasoning models.

Importing the package first settles how Triton runs (compiled on CUDA, interpreted on CPU) before
megatron-core or vLLM import triton themselves: see kernels/_triton_env.py; and, without CUDA, makes
megatron's jit fusions plain functions before megatron is imported (engine/parallel/cpu_compat.py, item 7).
"""

import kernels._triton_env  # noqa: F401  (must precede any `import triton`)
from engine.parallel.cpu_compat import eager_megatron_fusions

eager_megatron_fusions()  # CPU only, before anything imports megatron (engine/parallel/cpu_compat.py, item 7)
