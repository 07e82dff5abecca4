"""The build's CUDA decision (CMakeLists.txt): under CGD_CUDA=AUTO a machine without a usable CUDA compiler gets
the CPU kernels, is told so at configure time, and build_info.txt (cgd.BUILD_INFO) records why; CGD_CUDA=ON
makes the same situation an error. Configure-only runs of the real CMake project, without building."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def configure(build_dir: pathlib.Path, cuda: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDACXX=str(build_dir / "no-such-nvcc"))
    return subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DCGD_CUDA={cuda}", "-DCGD_TESTS=OFF",
         "-DCGD_BENCHMARKS=OFF", f"-DPython3_EXECUTABLE={sys.executable}"],
        env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_auto_without_a_cuda_compiler_builds_the_cpu_kernels_and_says_why(tmp_path):
    result = configure(tmp_path / "auto", "AUTO")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torch-cgd: building the CPU kernels only: no CUDA compiler was found" in result.stdout
    info = dict(line.split("=", 1) for line in (tmp_path / "auto" / "build_info.txt").read_text().splitlines())
    assert info["cgd_cuda"] == "OFF" and info["cgd_cuda_why"].startswith("no CUDA compiler was found")
    assert info["abi"] == "stable" and info["torch_min"] == "2.11"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_on_without_a_cuda_compiler_is_an_error(tmp_path):
    result = configure(tmp_path / "on", "ON")
    assert result.returncode != 0
    message = " ".join(result.stderr.split())  # CMake wraps long messages
    assert "CGD_CUDA=ON but the CUDA kernels cannot be built: no CUDA compiler was found" in message
