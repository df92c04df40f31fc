"""Training engine for vision-language reasoning models.

Importing the package first settles how Triton runs (compiled on CUDA, interpreted on CPU) before
megatron-core or vLLM import triton themselves: see kernels/_triton_env.py.
"""

import kernels._triton_env  # noqa: F401  (must precede any `import triton`)
