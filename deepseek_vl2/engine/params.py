"""Generation settings: `GenerationParams`, which requests may share a batch, and the command-line options."""
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Optional, Sequence

SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed takes


@dataclass
class GenerationParams:
    max_new_tokens: int = 512
    temperature: float = 0.4  # <= 0 means greedy
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    top_k: int = 50  # when sampling (generate's default); 0 turns it off
    min_new_tokens: int = 0  # EOS is suppressed before this many new tokens

    def __post_init__(self):
        """Refuse settings generate would refuse later (or misread: a NaN temperature is not greedy,
        a str `stop` is not a list of one-character stop strings), naming the field."""
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise ValueError(f"GenerationParams.{name} must be a finite number, got {value!r}")
        count = self.max_new_tokens
        if isinstance(count, bool) or not isinstance(count, Integral) or count < 1:
            raise ValueError(f"GenerationParams.max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        for name in ("top_k", "min_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
                raise ValueError(f"GenerationParams.{name} must be an int >= 0, got {value!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, Integral)):
            raise ValueError(f"GenerationParams.seed must be an int or None, got {self.seed!r}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"GenerationParams.seed must fit in 64 bits ({SEED_RANGE[0]} to {SEED_RANGE[1]}), "
                             f"got {self.seed}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"GenerationParams.stop must be a list of strings, got {self.stop!r}")

    def sampling_options(self) -> dict:
        """These settings as `generate` takes them (greedy when temperature <= 0: then top_p and the
        repetition penalty are off, as the reference's inference.py does)."""
        sampling = self.temperature > 0
        return dict(do_sample=sampling, temperature=self.temperature if sampling else 1.0,
                    top_p=self.top_p if sampling else 1.0,
                    repetition_penalty=self.repetition_penalty if sampling else 1.0,
                    top_k=self.top_k, min_new_tokens=self.min_new_tokens)


def sampling_key(params: GenerationParams) -> tuple:
    """What must be equal for two requests to share a batch (greedy ignores top_p and the penalty)."""
    if params.temperature <= 0:
        return ("greedy", params.min_new_tokens)
    return (params.temperature, params.top_p, params.repetition_penalty, params.top_k, params.min_new_tokens)


def add_engine_arguments(parser) -> None:
    """--chunk_size, --dtype, --device and --quantization, as inference.py, the server and the web demo
    take them."""
    parser.add_argument("--chunk_size", type=int, default=-1,
                        help="prefill the prompt in chunks of this many tokens (-1: in one go; 512 bounds the memory)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--quantization", choices=["int8", "int4"],
                        help="quantize the language model's weights while loading (a checkpoint saved quantized "
                             "loads quantized without this)")
