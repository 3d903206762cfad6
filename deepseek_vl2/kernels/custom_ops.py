"""Registration of Triton launchers as torch custom ops, done lazily before the first torch.compile."""
import functools

import torch

from ..modeling.devices import on_tensor_device

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: dispatch.py never calls the kernels without CUDA
    triton = tl = None

_KERNEL_OPS = {}  # name -> [launcher, fake, custom op or None]


def kernel_op(name: str, fake):
    """Mark the decorated launcher as the custom op deepseek_vl2::`name` (with `fake` for shape
    inference), so that torch.compile treats it as one opaque kernel, and return a function that
    calls the op while compiling and the launcher directly otherwise: through the dispatcher a call
    costs ~25 us more host time (an H100 host, benchmarks/host_overhead.py), which adds up over the
    hundreds of kernel calls of an eager prefill. The op is registered by `register_kernel_ops`,
    before the first compilation, so that a process that never compiles never pays for it."""

    def wrap(launcher):
        entry = _KERNEL_OPS.setdefault(name, [launcher, fake, None])
        eager = on_tensor_device(launcher)  # compiled regions run on one device, made current by generate

        @functools.wraps(launcher)
        def call(*args, **kwargs):
            return entry[2](*args, **kwargs) if torch.compiler.is_compiling() else eager(*args, **kwargs)

        return call

    return wrap


def register_kernel_ops() -> None:
    """Register every `kernel_op` as a torch custom op (once); call before torch.compile."""
    for name, entry in _KERNEL_OPS.items():
        if entry[2] is None:
            launcher, fake, _ = entry
            op = torch.library.custom_op(f"deepseek_vl2::{name}", mutates_args=())(launcher)
            op.register_fake(fake)
            entry[2] = op

