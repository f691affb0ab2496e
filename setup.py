"""Build nanomoe's compiled operator library, ``nanomoe._C``.

One switchboard: CPU sources always; CUDA sources when the installed torch was built with CUDA
(``torch.version.cuda``) and ``nvcc`` is found. A build machine may have no GPU, so GPU presence is
never the test. Environment switches:

- ``NANOMOE_CUDA=0`` / ``=1``: skip / require the CUDA build.
- ``TORCH_CUDA_ARCH_LIST``: target architectures; ``8.0;9.0`` when no GPU is visible.
- ``MAX_JOBS``: parallel compile jobs (read by torch's ninja builder).
"""

import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def want_cuda() -> bool:
    switch = os.environ.get("NANOMOE_CUDA")
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    possible = torch.version.cuda is not None and bool(nvcc) and os.path.exists(str(nvcc))
    if switch == "1" and not possible:
        raise RuntimeError(
            "NANOMOE_CUDA=1 but the CUDA build is impossible: "
            f"torch.version.cuda={torch.version.cuda}, nvcc={nvcc}"
        )
    return possible and switch != "0"


cpu_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
cuda_sources = sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp")
# -fopenmp: at::parallel_for is a header template that runs its body on one thread unless the
# caller itself is compiled with OpenMP.
cxx_flags = ["-O3", "-fvisibility=hidden", "-fopenmp"]
link_flags = ["-fopenmp"]

if want_cuda() and cuda_sources:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        if not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        elif torch.cuda.get_device_capability() < (8, 0):
            # The kernels use bfloat16 tensor cores and cp.async, both new in sm_80.
            raise RuntimeError(
                "nanomoe's CUDA kernels need a GPU of compute capability 8.0 or newer "
                f"(this one is {torch.cuda.get_device_capability()}); build with NANOMOE_CUDA=0 "
                "for the CPU kernels only"
            )
    extension = CUDAExtension(
        "nanomoe._C",
        cpu_sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link_flags,
    )
    print(f"nanomoe: building CPU + CUDA kernels for {os.environ.get('TORCH_CUDA_ARCH_LIST')}")
else:
    extension = CppExtension(
        "nanomoe._C", cpu_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
    )
    print("nanomoe: building CPU kernels only (no CUDA torch or no nvcc, or NANOMOE_CUDA=0)")

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
