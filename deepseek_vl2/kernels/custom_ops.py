"""How our Triton kernels are launched: as torch custom ops inside compiled regions (registered
lazily, before the first torch.compile), and, where asked for, as programmatic dependent launches
on Hopper and later.

Programmatic dependent launch (PDL): a kernel launched with it may start while the kernel before it
on the stream is still running, so its programs are placed and set up by the time that one ends
instead of after it (a decode step is hundreds of kernels of a few microseconds each; the gaps
between them are a large part of the step). Every kernel of ours therefore begins with
`await_earlier_kernels`: it waits until the kernels before it have finished and their writes are
visible, before it reads or writes any tensor, then lets the next kernel launch. Since no kernel
lets the next one start before its own wait has returned, at most two kernels overlap, and only in
the part before the later one's wait. torch.compile's kernels are then launched the same way and
made to keep the same rule (`compiled_kernel_options`, used by generation/cuda_graphs.py). CUDA
graphs keep the dependency as captured.

It is off unless DEEPSEEK_VL2_DEPENDENT_LAUNCH=1: on an H200 it first made batch-1 decode 4-14%
faster, but base's int4 greedy tokens then differed from plain launches at the fifth token, in every
rebuild, and only with torch.compile's kernels launched this way, on one machine (not on the next),
which is not explained yet (benchmarks/RESULTS.md, twenty-fifth and twenty-sixth sessions); since the
decode step has fewer, fused kernels it measures 4% slower there (thirty-fifth session). Off, every
kernel launches in plain stream order.
"""
import functools
import os

import torch

from ..modeling.devices import on_tensor_device

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: dispatch.py never calls the kernels without CUDA
    triton = tl = None

DEPENDENT_LAUNCH = os.environ.get("DEEPSEEK_VL2_DEPENDENT_LAUNCH", "0") == "1"

_KERNEL_OPS = {}  # name -> [launcher, fake, custom op or None, names of the arguments it mutates]


def kernel_op(name: str, fake, mutates: tuple = ()):
    """Mark the decorated launcher as the custom op deepseek_vl2::`name` (with `fake` for shape
    inference; `mutates`: the names of the arguments it writes in place), so that torch.compile
    treats it as one opaque kernel, and return a function that
    calls the op while compiling and the launcher directly otherwise: through the dispatcher a call
    costs ~25 us more host time (an H100 host, benchmarks/host_overhead.py), which adds up over the
    hundreds of kernel calls of an eager prefill. The op is registered by `register_kernel_ops`,
    before the first compilation, so that a process that never compiles never pays for it."""

    def wrap(launcher):
        entry = _KERNEL_OPS.setdefault(name, [launcher, fake, None, mutates])
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
            launcher, fake, _, mutates = entry
            op = torch.library.custom_op(f"deepseek_vl2::{name}", mutates_args=mutates)(launcher)
            op.register_fake(fake)
            entry[2] = op


@functools.cache
def _has_dependent_launch(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9  # griddepcontrol: sm_90 and later


def launch_options(t: torch.Tensor) -> dict:
    """The keyword arguments every launch of our kernels on `t`'s device adds: PDL (the kernels'
    constexpr: wait for the earlier kernels) and Triton's launch_pdl, both on for CUDA devices of
    compute capability 9.0 and later when DEPENDENT_LAUNCH is on."""
    on = DEPENDENT_LAUNCH and t.is_cuda and _has_dependent_launch(t.device.index if t.device.index is not None
                                                                   else torch.cuda.current_device())
    return dict(PDL=on, launch_pdl=on)


def tiles_or_defaults(given: tuple, defaults: tuple) -> tuple:
    """A launcher's tile arguments (BLOCK_N, BLOCK_K, warps, stages, ...): each given one, else its default."""
    return tuple(default if value is None else value for value, default in zip(given, defaults))


def compiled_kernel_options() -> dict:
    """Inductor's options for compiled regions: its kernels launched as dependent launches, like ours,
    where DEPENDENT_LAUNCH is on and inductor could be made to keep our rule (`_inductor_waits_first`);
    otherwise in plain stream order."""
    return {"triton.enable_pdl": DEPENDENT_LAUNCH and _inductor_waits_first()}


@functools.cache
def _inductor_waits_first() -> bool:
    """Make every kernel torch.compile generates wait for the earlier kernels before its first read
    or write, as ours do; False where this torch's code generator lacks the hook used.

    Inductor alone waits only before touching what the node just before it in the same graph wrote
    (or, for a store, read). That is safe only while every kernel waits somewhere before the next
    one launches; a kernel that reads nothing (a fill) never waits, so the kernel after it can start
    while the one before it is still writing and read its output too early (on an H200, base's
    greedy tokens changed at the first decode step). Inductor waits before every access of a graph's
    first kernel, which has no node before it; the wrapper shows every access that case, and inductor
    keeps each kernel's first wait only."""
    try:
        from torch._inductor.codegen.triton import TritonKernel
        from torch._inductor.virtualized import V
    except ImportError:
        return False
    rule = getattr(TritonKernel, "_handle_pdl_before_access", None)
    if rule is None:
        return False

    @functools.wraps(rule)
    def wait_before_every_access(self, *args, **kwargs):
        scheduler = V.graph.scheduler
        if scheduler is None or not hasattr(scheduler, "previous_node"):
            return rule(self, *args, **kwargs)
        previous, scheduler.previous_node = scheduler.previous_node, None
        try:
            return rule(self, *args, **kwargs)
        finally:
            scheduler.previous_node = previous

    TritonKernel._handle_pdl_before_access = wait_before_every_access
    return True


if triton is not None:

    @triton.jit
    def await_earlier_kernels(PDL: tl.constexpr):
        """With PDL: block until the kernels launched before this one have finished (their writes
        visible), then allow the next kernel to launch. Call before touching any tensor an earlier
        kernel may write or read; only tensors no kernel of the step writes (weights) may be read before."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
