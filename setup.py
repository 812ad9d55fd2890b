"""Builds sdict_ext._C: the CPU kernels always, the CUDA kernels where torch has CUDA.

CUDA is built when torch was built with CUDA and a toolkit is found (CUDA_HOME), never
because a GPU happens to be visible; SDICT_EXT_CUDA=0/1 overrides the choice.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
from collections.abc import Mapping

import torch


def _toolkit_of_nvcc() -> str | None:
    """The CUDA toolkit of the nvcc on PATH, when torch would not find it by itself.

    Without CUDA_HOME, torch takes the folder above nvcc's; where nvcc is a wrapper
    script (e.g. /usr/local/bin/nvcc running /usr/local/cuda-13.0/bin/nvcc) that folder
    has no CUDA headers and the build fails on cuda_runtime.h. nvcc's dry run names
    its own toolkit (TOP).
    """
    if torch.version.cuda is None or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    beside = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(beside, "include", "cuda_runtime.h")):
        return None
    try:
        dry = subprocess.run(
            [nvcc, "--dryrun", "-c", "sdict_ext_probe.cu", "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
    if found is None:
        return None
    top = os.path.normpath(found.group(1).strip())
    return top if os.path.exists(os.path.join(top, "include", "cuda_runtime.h")) else None


# Before torch.utils.cpp_extension is imported: it reads CUDA_HOME once, at import.
_toolkit = _toolkit_of_nvcc()
if _toolkit is not None:
    os.environ["CUDA_HOME"] = _toolkit

from setuptools import find_packages, setup  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    forced = os.environ.get("SDICT_EXT_CUDA")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if forced is None:
        return available
    if forced == "1" and not available:
        raise RuntimeError(
            "SDICT_EXT_CUDA=1 but torch has no CUDA or CUDA_HOME is unset; "
            "install a CUDA build of torch and a CUDA toolkit, or unset SDICT_EXT_CUDA"
        )
    return forced == "1"


#: Built when nothing names an architecture and no GPU is visible: Hopper machine code
#: (the GPU machines this project is measured on), with PTX that newer GPUs compile.
DEFAULT_CUDA_ARCH_LIST = "9.0+PTX"


def default_cuda_arch_list(environ: Mapping[str, str], visible_gpus: int) -> str | None:
    """The TORCH_CUDA_ARCH_LIST to set for a CUDA build, or None to leave torch's choice.

    With the variable unset, torch builds for the visible GPUs; with none visible (a
    build machine, a container without devices) its detection fails with an
    ``IndexError`` instead of building anything. An explicit list always wins.
    """
    if environ.get("TORCH_CUDA_ARCH_LIST") or visible_gpus > 0:
        return None
    return DEFAULT_CUDA_ARCH_LIST


def _visible_gpus() -> int:
    try:
        return torch.cuda.device_count()
    except RuntimeError:  # a broken driver: no GPU to detect either
        return 0


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _torch_libgomp() -> str | None:
    """The OpenMP runtime bundled with torch (by SONAME, what libtorch_cpu loads), if any."""
    here = os.path.dirname(torch.__file__)
    for folder in (os.path.join(here, "lib"), os.path.join(os.path.dirname(here), "torch.libs")):
        found = sorted(glob.glob(os.path.join(folder, "libgomp*.so*")))
        if found:
            return found[0]
    return None


def _extension():
    with_cuda = _want_cuda()
    # csrc/python: the module and its bindings; csrc/plan: the device-agnostic planners;
    # csrc/cpu (and csrc/cuda below): the backends that execute the plans.
    sources = [
        src for folder in ("csrc", "csrc/python", "csrc/plan", "csrc/cpu")
        for src in _sources(f"{folder}/*.cpp")
    ]
    cxx = ["-O3", "-fvisibility=hidden"]
    link: list[str] = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is a header template whose threads are an `omp parallel`
        # pragma: compiled without OpenMP it silently runs the whole range on the
        # calling thread. With it, the kernels must share torch's own OpenMP runtime
        # and thread count, so they link the libgomp that torch ships where it ships
        # one (a second runtime would bring a second thread pool).
        cxx.append("-fopenmp")
        link += [_torch_libgomp() or "-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    if not with_cuda:
        return CppExtension(
            "sdict_ext._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
    sources += _sources("csrc/cuda/*.cpp") + _sources("csrc/cuda/*.cu")
    arch_list = default_cuda_arch_list(os.environ, _visible_gpus())
    if arch_list is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    nvcc = ["-O3", "-lineinfo"]
    return CUDAExtension(
        "sdict_ext._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )


# Guarded so tests can import the helpers above; setuptools runs this file as __main__.
if __name__ == "__main__":
    setup(
        packages=find_packages(include=["sdict_ext", "sdict_ext.*"]),
        ext_modules=[_extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
