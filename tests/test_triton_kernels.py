"""The Triton kernels against the PyTorch ops they replace (checks in kernel_checks.py): on the CPU
through Triton's interpreter, and on CUDA in bf16."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernel_checks

triton = pytest.importorskip("triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the compiled kernels are checked instead")
def test_kernels_in_triton_interpreter():
    """(Needs a recent Triton: the 3.6 interpreter fails on loops bounded by kernel arguments.)"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    script = Path(__file__).with_name("kernel_checks.py")
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ok ") == len(kernel_checks.CHECKS), done.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("check", kernel_checks.CHECKS, ids=lambda c: c.__name__)
def test_kernels_on_cuda(check):
    check("cuda", torch.bfloat16, 2e-2)
