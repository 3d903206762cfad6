"""custom_ops.py: which launches are programmatic dependent launches, and that every kernel of ours
waits for the earlier kernels before anything else (a kernel launched early that read or wrote a
tensor before its wait would race with the kernel before it)."""
import ast
import importlib
import inspect
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from decode_paths import assert_same_or_near_tie, finite_difference, first_divergence, greedy, text_prompt
from deepseek_vl2.generation import cuda_graphs
from deepseek_vl2.kernels import custom_ops
from deepseek_vl2.models import DeepseekVLV2ForCausalLM
from goldens import CHECKPOINTS

KERNEL_MODULES = ["decode_attention", "gemv", "moe_decode", "moe_glue", "norm_rope", "quant_gemv",
                  "quant_grouped_gemm", "router"]


def _cuda_like(index):
    return SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=index))


@pytest.mark.parametrize("value, on", [(None, False), ("0", False), ("1", True)])
def test_dependent_launch_only_when_asked_for(value, on):
    env = {k: v for k, v in os.environ.items() if k != "DEEPSEEK_VL2_DEPENDENT_LAUNCH"}
    if value is not None:
        env["DEEPSEEK_VL2_DEPENDENT_LAUNCH"] = value
    shown = subprocess.run([sys.executable, "-c", "from deepseek_vl2.kernels import custom_ops; "
                            "print(custom_ops.DEPENDENT_LAUNCH)"], env=env, capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == str(on)


def test_launch_options_on_for_hopper_devices_only(monkeypatch):
    monkeypatch.setattr(custom_ops, "DEPENDENT_LAUNCH", True)
    monkeypatch.setattr(custom_ops, "_has_dependent_launch", lambda index: index == 1)  # cuda:1 is sm_90+
    assert custom_ops.launch_options(_cuda_like(1)) == dict(PDL=True, launch_pdl=True)
    assert custom_ops.launch_options(_cuda_like(0)) == dict(PDL=False, launch_pdl=False)
    assert custom_ops.launch_options(torch.zeros(1)) == dict(PDL=False, launch_pdl=False)  # CPU (the interpreter)
    monkeypatch.setattr(custom_ops, "DEPENDENT_LAUNCH", False)
    assert custom_ops.launch_options(_cuda_like(1)) == dict(PDL=False, launch_pdl=False)


def test_compiled_regions_follow_the_same_switch(monkeypatch):
    for on in (True, False):
        monkeypatch.setattr(custom_ops, "DEPENDENT_LAUNCH", on)
        options = cuda_graphs.compile_options()
        assert options["options"]["triton.enable_pdl"] is on
        assert options["fullgraph"] and options["dynamic"] is False


def _kernels():
    """(module, name, JITFunction) of every `*_kernel` Triton function in the kernel modules."""
    pytest.importorskip("triton")
    from triton.runtime.jit import JITFunction

    found = []
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"deepseek_vl2.kernels.{module_name}")
        for name, value in vars(module).items():
            if isinstance(value, JITFunction) and name.endswith("_kernel"):
                found.append((module_name, name, value))
    return found


def test_every_kernel_waits_for_the_earlier_ones_first():
    kernels = _kernels()
    assert len(kernels) >= 12  # gemv, quant gemv and dequantize, grouped GEMM, attention and combine, ...
    for module_name, name, kernel in kernels:
        tree = ast.parse(textwrap.dedent(inspect.getsource(kernel.fn)))
        function = tree.body[0]
        assert "PDL" in kernel.arg_names, f"{module_name}.{name} has no PDL parameter"
        body = [s for s in function.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
        first = body[0]
        assert isinstance(first, ast.Expr) and ast.unparse(first) == "await_earlier_kernels(PDL)", \
            f"{module_name}.{name} starts with {ast.unparse(first)!r}, not await_earlier_kernels(PDL)"


def test_every_launch_passes_the_launch_options():
    """Each `kernel[grid](...)` call in the kernel modules ends with **launch_options(...): a kernel
    launched without it would run its wait as a no-op, one launched with launch_pdl alone would race."""
    for module_name in KERNEL_MODULES:
        source = inspect.getsource(importlib.import_module(f"deepseek_vl2.kernels.{module_name}"))
        launches = [node for node in ast.walk(ast.parse(source))
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id.endswith("_kernel")]
        assert launches, module_name
        for call in launches:
            spread = [ast.unparse(k.value) for k in call.keywords if k.arg is None]
            assert spread and spread[-1].startswith("launch_options(") \
                and all(s.startswith("kernel_arguments(") for s in spread[:-1]), \
                f"{module_name}: {ast.unparse(call.func)} is launched without **launch_options(...)"


def _skip_without_dependent_launch():
    if not custom_ops._has_dependent_launch(torch.cuda.current_device()):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_chain_of_dependent_launches_equals_plain_stream_order_in_a_graph(monkeypatch):
    """Sixty kernels, each reading what the one before wrote (gemv with silu_mul, then the router's
    gemv and top-k, then the pairs' combine), replayed from a CUDA graph many times: with programmatic
    dependent launch the outputs equal plain stream order's to the bit (a kernel that read its input
    before its wait would now and then see the previous replay's values instead)."""
    pytest.importorskip("triton")
    _skip_without_dependent_launch()
    from deepseek_vl2.kernels import gemv, moe_glue, router

    g = torch.Generator(device="cuda").manual_seed(0)
    width, experts, k = 512, 16, 4
    ups = [torch.randn(2 * width, width, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05 for _ in range(20)]
    gates = [torch.randn(experts, width, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(20)]
    x = torch.randn(1, width, device="cuda", generator=g, dtype=torch.bfloat16)

    def chain():
        h = x
        for up, gate in zip(ups, gates):
            h = gemv.gemv(h, up, None, 1, True)  # [1, width] = silu(gate) * up
            logits = gemv.gemv(h, gate, None, 1, False, True)
            ids, weights = router.route(logits, None, k, False, True, 1.0)
            pairs = h.expand(k, width) * (ids.T.to(h.dtype) + 1)  # each pair's row, scaled by its expert id
            h = moe_glue.combine_pairs(pairs, weights)
            h = h * torch.rsqrt(h.float().pow(2).mean() + 1e-6).to(h.dtype)  # kept near unit size
        return h

    outputs = {}
    with torch.inference_mode():
        for on in (False, True):
            monkeypatch.setattr(custom_ops, "DEPENDENT_LAUNCH", on)
            chain()  # compile this mode's kernels outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = chain()
            replays = []
            g.manual_seed(1)  # the same inputs in both modes
            for _ in range(50):
                x.normal_(generator=g)  # new inputs each replay: stale reads would show
                graph.replay()
                replays.append(out.clone())
            outputs[on] = torch.stack(replays)
        assert torch.equal(outputs[True], outputs[False])
        assert outputs[True].abs().sum() > 0 and len(set(outputs[True].sum(dim=(1, 2)).tolist())) > 1


def _assert_every_kernel_waits_first(codes) -> list:
    """Check that each Triton kernel in inductor's generated modules is a dependent launch that waits
    before its first load or store; return the kernels' sources."""
    code = "\n".join(codes)
    kernels = [chunk[chunk.index("def "):] for chunk in code.split("@triton.jit")[1:]]
    assert kernels and "'launch_pdl': True" in code
    for kernel in kernels:
        accesses = [i for i in (kernel.find("tl.load("), kernel.find("tl.store(")) if i >= 0]
        assert 0 <= kernel.find("gdc_wait()") < min(accesses), kernel
    return kernels


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_compiled_kernel_waits_before_its_first_access(monkeypatch):
    """torch.compile's kernels, launched as dependent launches, wait for the earlier kernels before
    their first load or store, a fill (which loads nothing) included; the results equal eager's."""
    _skip_without_dependent_launch()
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(custom_ops, "DEPENDENT_LAUNCH", True)
    assert cuda_graphs.compile_options()["options"]["triton.enable_pdl"] is True

    def step(x, out):
        column_sums = x.sum(dim=0)
        out.fill_(2.0)  # a kernel that reads nothing, between the sums and their reader
        return torch.sigmoid(x * column_sums)

    torch._dynamo.reset()
    x = torch.randn(64, 300, device="cuda")
    out = torch.empty(1000, device="cuda")
    compiled = torch.compile(step, **cuda_graphs.compile_options())
    result, codes = run_and_get_code(compiled, x, out)
    kernels = _assert_every_kernel_waits_first(codes)
    assert any("tl.store(" in k and "tl.load(" not in k for k in kernels)  # the fill is its own kernel
    torch.testing.assert_close(result, step(x, torch.empty_like(out)), rtol=1e-6, atol=1e-6)
    assert torch.equal(out, torch.full_like(out, 2.0))
    torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", [None, "int4"], ids=["bf16", "int4"])
@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_dependent_launches_keep_the_fast_path(monkeypatch, name, scheme):
    """A fixture model's fast path (compiled regions, CUDA graphs) with dependent launches on gives the
    tokens it gives with them off, or first differs at a near-tie (a launch changes no arithmetic of
    our kernels; torch.compile's own kernels are compiled anew with their waits, which may round
    differently). Every compiled kernel of the decode step waits before its first access."""
    _skip_without_dependent_launch()
    from torch._inductor.utils import run_and_get_code

    model = DeepseekVLV2ForCausalLM.from_pretrained(str(CHECKPOINTS[name]), dtype=torch.bfloat16, device_map="cuda",
                                                    quantization=scheme, progress=False, warm_up=False)
    lm = model.language
    lm.compile_decode_after = 0
    embeds, mask = text_prompt(model)
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(custom_ops, "DEPENDENT_LAUNCH", on)
        cuda_graphs.release_decoders(lm)
        runs[on], codes = run_and_get_code(lambda: greedy(lm, embeds, mask, 24, graphs=True))
        if on:
            _assert_every_kernel_waits_first(codes)
    parted = first_divergence(runs[True].sequences[0], runs[False].sequences[0])
    steps = list(zip(runs[True].scores, runs[False].scores))[:None if parted is None else parted + 1]
    print(f"tokens part at step {parted}; largest score difference up to there "
          f"{max(finite_difference(a, b) for a, b in steps):.3g}")
    assert_same_or_near_tie(runs[True], runs[False])
