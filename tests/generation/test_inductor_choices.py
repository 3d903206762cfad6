"""generation/inductor_choices.py: which reductions the decode pieces' heuristics make persistent, that
they apply only inside the compiled pieces' calls, and (CUDA) the kernel inductor then generates."""
import pytest
import sympy
import torch

from deepseek_vl2.generation import inductor_choices
from deepseek_vl2.generation.inductor_choices import (
    PERSISTENT_REDUCTION_NUMEL as LIMIT,
    decode_heuristics,
    persistent_inner_reduction,
    with_decode_heuristics,
)


def test_inner_reductions_up_to_the_limit_are_persistent():
    for numel in (1280, 2048, 2560, LIMIT, sympy.Integer(2560)):
        assert persistent_inner_reduction(True, numel, False), numel
    assert not persistent_inner_reduction(True, LIMIT + 1, False)
    assert not persistent_inner_reduction(True, 129280, False)  # a vocabulary row: looped, as inductor has it
    assert not persistent_inner_reduction(False, 2560, False)  # an outer reduction: inductor's choice
    assert not persistent_inner_reduction(True, 2560, True)  # a cooperative one: inductor's choice
    assert not persistent_inner_reduction(True, sympy.Symbol("s0"), False)  # a width not known statically


class _InnerRow:
    """The reduction features inductor asks about, for one static inner reduction of `numel` columns."""

    def __init__(self, numel):
        self.reduction_numel = sympy.Integer(numel)

    def get_reduction_hint(self):
        from torch._inductor.runtime.hints import ReductionHint
        return ReductionHint.INNER

    def strict_sum_rblock(self):
        return None


@pytest.fixture
def choices_class():
    """inductor_choices' InductorChoices subclass (the test skipped where this torch has none)."""
    found = inductor_choices._choices_class()
    if found is None:
        pytest.skip("this torch has no InductorChoices override")
    return found


def test_the_heuristics_apply_inside_the_context_only(choices_class):
    from torch._inductor.virtualized import V

    before = type(V.choices)
    with decode_heuristics():
        assert isinstance(V.choices, choices_class)
        assert V.choices.should_use_persistent_reduction(_InnerRow(2560), False)
    assert type(V.choices) is before
    assert not issubclass(before, choices_class)


def test_compile_options_name_the_heuristics(choices_class):
    if not inductor_choices.config_options():
        pytest.skip("this torch has no InductorChoices override in its config")
    factory = inductor_choices.config_options()["inductor_choices_class"]
    assert isinstance(factory(), choices_class)
    assert factory().uuid() == f"deepseek_vl2.decode_choices.persistent_inner_{LIMIT}"
    from deepseek_vl2.generation import cuda_graphs
    assert cuda_graphs.compile_options()["options"]["inductor_choices_class"] is factory


def test_wrapped_function_runs_under_the_heuristics(choices_class):
    from torch._inductor.virtualized import V

    seen = []
    wrapped = with_decode_heuristics(lambda x: seen.append(type(V.choices)) or x + 1)
    assert wrapped(torch.ones(2)).tolist() == [2.0, 2.0]
    assert seen == [choices_class]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_decode_norm_of_base_width_compiles_persistent():
    """Base's fused expert combine, residual sum and norm at one row: one persistent kernel under the
    heuristics (a looped one without), and the same values as eager."""
    from torch._inductor.utils import run_and_get_code

    def combine_add_norm(experts, weights, x, w):  # the experts' terms added in pair order, as dispatch.moe has them
        h = x + sum(experts[i].float() * weights[i] for i in range(experts.shape[0])).to(x.dtype)
        f = h.float()
        return h, w * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)

    g = torch.Generator(device="cuda").manual_seed(0)
    args = (torch.randn(8, 2560, device="cuda", generator=g).bfloat16(), torch.rand(8, device="cuda", generator=g),
            torch.randn(2560, device="cuda", generator=g).bfloat16(),
            torch.randn(2560, device="cuda", generator=g).bfloat16())
    want = combine_add_norm(*args)
    torch._dynamo.reset()
    compiled = torch.compile(combine_add_norm, fullgraph=True, options=inductor_choices.config_options())
    got, (code,) = run_and_get_code(with_decode_heuristics(compiled), *args)
    assert "triton_per_" in code and "triton_red_" not in code
    torch._dynamo.reset()
    # inductor's own choice at this width, not the graph cached above (the options keep their cache keys apart)
    _, (plain,) = run_and_get_code(torch.compile(combine_add_norm, fullgraph=True), *args)
    assert "triton_red_" in plain and "triton_per_" not in plain
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_.float(), w_.float(), atol=2e-2, rtol=1e-2)
