"""Specs of the build (``setup.py``, the Makefile) on machines like the GPU one: torch
already there, no package index reachable, no GPU visible to the builder."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _setup_module():
    # setup.py calls setup() only as __main__ (how setuptools runs it), so importing it
    # under another name gives its helpers alone.
    spec = importlib.util.spec_from_file_location("sdict_ext_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cuda_arch_list_defaults_to_hopper_with_ptx_when_unset_and_no_gpu_is_visible():
    setup = _setup_module()
    assert setup.default_cuda_arch_list({}, visible_gpus=0) == "9.0+PTX"
    assert setup.default_cuda_arch_list({"TORCH_CUDA_ARCH_LIST": ""}, visible_gpus=0) == "9.0+PTX"


def test_cuda_arch_list_is_left_to_the_user_or_to_torch_when_either_can_choose():
    setup = _setup_module()
    assert setup.default_cuda_arch_list({"TORCH_CUDA_ARCH_LIST": "8.0"}, visible_gpus=0) is None
    assert setup.default_cuda_arch_list({}, visible_gpus=1) is None


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_setup_with_torch_present_survives_a_pip_that_reaches_no_index(tmp_path):
    # A python3 that has torch but no ninja (the GPU machine's situation when a module is
    # missing); its pip installs into a scratch folder, from an index nobody serves.
    blocker = tmp_path / "blocked"
    blocker.mkdir()
    (blocker / "ninja.py").write_text("raise ImportError('ninja hidden by the test')\n")
    fake = tmp_path / "bin"
    fake.mkdir()
    python3 = fake / "python3"
    python3.write_text(
        "#!/bin/bash\n"
        f'if [ "$1" = -m ] && [ "$2" = pip ]; then\n'
        f'  exec "{sys.executable}" -m pip "${{@:3}}" --target "{tmp_path / "site"}"\n'
        "fi\n"
        f'PYTHONPATH="{blocker}" exec "{sys.executable}" "$@"\n'
    )
    python3.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
        "PIP_NO_INDEX": "1",
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    proc = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "setup"], env=env, capture_output=True, text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pytest / ninja not installed (no package index?)" in proc.stdout
    assert not (tmp_path / "site").exists() or not any((tmp_path / "site").iterdir())


def test_gpu_session_out_of_time_still_ends_with_its_summary(tmp_path):
    # The device tool returns the end of the output: whatever ran, the summary is last.
    env = {**os.environ, "OUT": str(tmp_path), "DEADLINE": "0"}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_session.sh")], env=env, capture_output=True,
        text=True, timeout=60, cwd=ROOT,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 1
    assert lines[0].startswith("===== gpu_session summary (SIZE=small")
    steps = ["machine", "build", "cuda", "bench:ops", "bench:staging"]
    assert [line.split()[:2] for line in lines[1:6]] == [[s, "SKIPPED"] for s in steps]
    assert lines[-1].startswith("verdict: 5 of 5 steps failed or did not run: machine (not run")


def test_gpu_session_finds_compute_sanitizer_under_cuda_home_when_not_on_path(tmp_path):
    cuda_home = tmp_path / "cuda"
    (cuda_home / "bin").mkdir(parents=True)
    sanitizer = cuda_home / "bin" / "compute-sanitizer"
    sanitizer.write_text("#!/bin/sh\n")
    sanitizer.chmod(0o755)
    out = tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "OUT": str(out), "CUDA_HOME": str(cuda_home),
           "HOME": str(tmp_path)}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_session.sh"), "machine"], env=env,
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert f"compute-sanitizer: {sanitizer}" in (out / "machine.log").read_text(), proc.stdout



def _compile_remote_read(flags: list[str]) -> str:
    """``c++ flags csrc/cpu/remote_read.cpp`` against torch's headers; its stdout."""
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("c++") or shutil.which("g++")
    cmd = [cxx, "-std=c++20", "-I", str(ROOT / "csrc" / "include"), *flags]
    for folder in include_paths():
        cmd += ["-isystem", folder]
    proc = subprocess.run(
        [*cmd, str(ROOT / "csrc" / "cpu" / "remote_read.cpp")], capture_output=True,
        text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="needs a C++ compiler"
)
def test_direct_read_source_builds_off_linux_without_process_vm_readv():
    # No macOS here: undefining __linux__ takes the branch a macOS build compiles. That
    # branch must neither include <sys/uio.h> nor call process_vm_readv, must report the
    # route unavailable, and must still compile (its entry points then raise).
    off_linux = _compile_remote_read(["-E", "-U__linux__"])
    # (Neither declared, as <sys/uio.h> would, nor called; the error message names it.)
    assert re.search(r"process_vm_readv\s*\(", off_linux) is None
    assert "sys/uio.h" not in off_linux
    assert "kDirectReadAvailable = false" in off_linux
    assert "needs Linux (process_vm_readv)" in off_linux
    _compile_remote_read(["-fsyntax-only", "-U__linux__", "-Werror=return-type"])
    # The guard is not vacuous: on Linux the same file reads through process_vm_readv.
    on_linux = _compile_remote_read(["-E"])
    assert re.search(r"process_vm_readv\s*\(pid", on_linux) is not None
    assert "kDirectReadAvailable = true" in on_linux
