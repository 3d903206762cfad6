"""Inductor's heuristics as the compiled decode pieces want them: one change to its defaults.

A decode step's norms reduce one row of the hidden size (1280 tiny, 2048 small, 2560 base) each,
fused with the sums before them (a layer's expert outputs and residual). Inductor makes such a
reduction persistent (the whole row in registers, one pass) only up to 1024 columns; wider rows
take a loop over blocks of at most 2048 columns that runs twice, once for the sum of squares and
once to normalise. At one row that is a single program waiting on each block's loads in turn:
base's fused combine, residual sum and norm took 4.5 us a layer looped, 3.0 persistent
(benchmarks/RESULTS.md, forty-eighth session). `decode_heuristics()` makes inner reductions up to
PERSISTENT_REDUCTION_NUMEL columns persistent while inductor generates the decode pieces' kernels;
everything else stays inductor's choice.

This goes through inductor's documented override (`V.set_choices_handler` with a subclass of
`InductorChoices`), scoped to the calls of the compiled pieces, so other torch.compile users in the
process keep inductor's defaults. The pieces' compile options also name the heuristics
(`config_options`: inductor's `inductor_choices_class`, read into its cache keys), so that a
compiled graph cached with them is not served to a compilation without them, nor the reverse.
Where this torch lacks the interface the defaults apply.
"""
import contextlib
import functools

PERSISTENT_REDUCTION_NUMEL = 4096  # inner reductions up to this many columns: one pass, the row in registers


def persistent_inner_reduction(hint_is_inner: bool, numel, cooperative: bool) -> bool:
    """Whether a reduction over `numel` columns (an int or a sympy number; anything else is not
    static) is one decode_heuristics makes persistent: an inner reduction, not split across programs
    (cooperative), of a static width up to PERSISTENT_REDUCTION_NUMEL."""
    if not hint_is_inner or cooperative or not getattr(numel, "is_number", isinstance(numel, int)):
        return False
    return int(numel) <= PERSISTENT_REDUCTION_NUMEL


@functools.cache
def _choices_class():
    """The InductorChoices subclass, or None where this torch lacks the interface."""
    try:
        from torch._inductor import config
        from torch._inductor.choices import InductorChoices
        from torch._inductor.runtime.hints import ReductionHint
        from torch._inductor.virtualized import V
    except ImportError:
        return None
    if not hasattr(V, "set_choices_handler") or not hasattr(InductorChoices, "should_use_persistent_reduction"):
        return None

    class DecodeChoices(InductorChoices):
        """InductorChoices with inner reductions up to PERSISTENT_REDUCTION_NUMEL columns persistent."""

        @staticmethod
        def uuid() -> str:  # what inductor's cache keys hold of `inductor_choices_class`
            return f"deepseek_vl2.decode_choices.persistent_inner_{PERSISTENT_REDUCTION_NUMEL}"

        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction) -> bool:
            strict_sum = getattr(features, "strict_sum_rblock", lambda: None)()
            if (config.triton.persistent_reductions and strict_sum is None
                    and persistent_inner_reduction(features.get_reduction_hint() == ReductionHint.INNER,
                                                   features.reduction_numel, cooperative_reduction)):
                return True
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    return DecodeChoices


def decode_choices():
    """A DecodeChoices (the factory inductor's `inductor_choices_class` config takes)."""
    return _choices_class()()


def config_options() -> dict:
    """torch.compile options naming DecodeChoices (`inductor_choices_class`), where this torch has both."""
    if _choices_class() is None:
        return {}
    from torch._inductor import config

    return {"inductor_choices_class": decode_choices} if hasattr(config, "inductor_choices_class") else {}


def decode_heuristics():
    """A context manager under which inductor generates kernels with DecodeChoices' heuristics (a
    no-op where this torch lacks the interface)."""
    if _choices_class() is None:
        return contextlib.nullcontext()
    from torch._inductor.virtualized import V

    return V.set_choices_handler(decode_choices())


def with_decode_heuristics(compiled):
    """`compiled` (a torch.compile'd function), its compilations made under decode_heuristics."""

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        with decode_heuristics():
            return compiled(*args, **kwargs)

    return call
