#!/usr/bin/env bash
# Builds sdict_ext against another torch release, in its own venv and its own copy of
# the working tree (the in-place build of the checkout is left alone), and runs the
# test suite there. Where torch has CUDA and nvcc exists, the CUDA kernels are built
# too (their tests skip without a GPU), so the whole CUDA build is checked.
#   bash scripts/test_other_torch.sh 2.11.0 [pytest args...]
# 2.11.0 is the GPU machine's torch (2.11.0+cu130); from PyPI it is a CUDA build,
# about 3 GB with its CUDA libraries, downloaded once into build/torch-<version>/venv.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: scripts/test_other_torch.sh TORCH_VERSION [pytest args...]}
shift
root=build/torch-$version
mkdir -p "$root"
if [ ! -x "$root/venv/bin/python" ] || ! "$root/venv/bin/python" -c "import torch" 2>/dev/null; then
  python3 -m venv "$root/venv"
  "$root/venv/bin/pip" install -q "torch==$version" numpy pytest ninja pybind11 "setuptools>=61" wheel packaging
fi
rm -rf "$root/src"
mkdir -p "$root/src"
git ls-files -co --exclude-standard -z | xargs -0 tar -cf - | tar -xf - -C "$root/src"
cd "$root/src"
py=../venv/bin/python
arch=${TORCH_CUDA_ARCH_LIST:-9.0}
TORCH_CUDA_ARCH_LIST=$arch $py setup.py -q build_ext --inplace -j "$(nproc)" > ../build.log 2>&1 \
  || { tail -30 ../build.log; exit 1; }
$py -c "import torch, sdict_ext; print('torch', torch.__version__, 'cuda kernels', sdict_ext.ops.has_cuda())"
$py -m pytest -q "$@"
