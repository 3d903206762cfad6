"""A chat engine over processor + model: conversation and images in, streamed answer out.

`inference.py`, the HTTP server and the web demo all answer through this class:

    engine = ChatEngine.load("deepseek-ai/deepseek-vl2-tiny")
    result = engine.chat(conversation, images, GenerationParams(max_new_tokens=256), on_text=print)
    result.text, result.boxes, result.timings

It prepares the prompt with the processor, prefills (chunked with `chunk_size`, as
`incremental_prefilling`), and generates with the reference's `inference.py` recipe: `generate`
gets the prompt ids too, so the repetition penalty covers them (P-GEN-1).

`chat_batch` answers several conversations as one left-padded batch (the server's scheduler uses
it); `chat` is a batch of one.
"""
import math
import time
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Callable, List, Optional, Sequence

import torch
from PIL import Image

from .grounding import GroundedBox, parse_grounding
from .models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor
from .models.processing_deepseek_vl_v2 import VLChatProcessorOutput


class PromptTooLongError(ValueError):
    """The prompt (text and image tokens) does not fit the model's context."""


@dataclass
class GenerationParams:
    max_new_tokens: int = 512
    temperature: float = 0.4  # <= 0 means greedy
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    seed: Optional[int] = None
    stop: Sequence[str] = ()

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
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, Integral)):
            raise ValueError(f"GenerationParams.seed must be an int or None, got {self.seed!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise ValueError(f"GenerationParams.stop must be a list of strings, got {self.stop!r}")


@dataclass
class Timings:
    prefill_ms: float = 0.0  # prompt embedding (vision) + prefill + first token
    decode_tokens: int = 0
    decode_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class ChatResult:
    text: str
    token_ids: List[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    boxes: List[GroundedBox] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)


class TextStream:
    """The transformers streamer protocol (`put` / `end`) for one sequence: keeps the generated ids,
    decodes them incrementally, hands each new piece of text to `on_text`, cuts at stop strings."""

    def __init__(self, tokenizer, hidden_ids: Sequence[int], stop: Sequence[str] = (),
                 on_text: Optional[Callable[[str], None]] = None):
        self.tokenizer = tokenizer
        self.hidden_ids = set(hidden_ids)
        self.stop = [s for s in stop if s]
        self.on_text = on_text
        self.ids: List[int] = []
        self.text = ""
        self.stopped = False
        self.first_token_time = None
        self.end_time = None
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first put is the prompt
            self._prompt_seen = True
            return
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        if self.stopped:
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        shown = [t for t in self.ids if t not in self.hidden_ids]
        text = self.tokenizer.decode(shown, skip_special_tokens=False)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        if len(text) > len(self.text) and self.on_text is not None:
            self.on_text(text[len(self.text):])
        self.text = text

    def end(self) -> None:
        self.end_time = time.perf_counter()


class ChatEngine:
    def __init__(self, model: DeepseekVLV2ForCausalLM, processor: DeepseekVLV2Processor, chunk_size: int = -1):
        if chunk_size == 0 or chunk_size < -1:
            raise ValueError(f"chunk_size must be -1 (no chunking) or a positive integer, got {chunk_size}")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.chunk_size = chunk_size

    @classmethod
    def from_args(cls, model_path: str, args) -> "ChatEngine":
        """Load with the options `add_engine_arguments` put on a command line."""
        return cls.load(model_path, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
                        chunk_size=args.chunk_size)

    @classmethod
    def load(cls, model_path: str, device: Optional[str] = None, dtype=None, chunk_size: int = -1) -> "ChatEngine":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        processor = DeepseekVLV2Processor.from_pretrained(model_path)
        model = DeepseekVLV2ForCausalLM.from_pretrained(model_path, dtype=dtype, device_map=device)
        return cls(model, processor, chunk_size)

    def prepare(self, conversation: list, images: List[Image.Image]):
        """Processor output for one conversation, as a batch of one on the model's device (images in its dtype)."""
        batch = self.processor.batchify([self.prepare_one(conversation, images)])
        return batch.to(self.model.device, dtype=self.model.dtype)

    def prepare_one(self, conversation: list, images: List[Image.Image]):
        """One processed (unbatched) sample for `chat_batch`; ValueError when the prompt does not fit
        the context or the conversation is malformed."""
        sample = self.processor.process_one(conversations=conversation, images=images, system_prompt="")
        limit = self.model.config.language_config.max_position_embeddings
        if len(sample) >= limit:
            raise PromptTooLongError(f"the prompt is {len(sample)} tokens, beyond the model's context of {limit}; "
                                     "use fewer or smaller images or a shorter conversation")
        return sample

    def chat(self, conversation: list, images: List[Image.Image], params: GenerationParams = GenerationParams(),
             on_text: Optional[Callable[[str], None]] = None) -> ChatResult:
        return self.chat_batch([BatchRow(self.prepare_one(conversation, images), params, on_text)])[0]

    def chat_batch(self, rows: Sequence["BatchRow"]) -> List[ChatResult]:
        """Answer several prepared conversations as one left-padded batch.

        The rows share one set of sampling settings (temperature, top_p, repetition_penalty; a ValueError
        otherwise), and a seeded row must be alone, so that its seed reproduces the single-row result.
        Each row ends on its own: at EOS, at one of its stop strings, after its max_new_tokens, or when
        its `is_cancelled()` turns true; a row that has ended is padded while the others go on.
        `max_new_tokens` is capped by what the longest prompt leaves of the context."""
        if not rows:
            raise ValueError("chat_batch needs at least one row")
        params = rows[0].params
        if any(sampling_key(row.params) != sampling_key(params) for row in rows):
            raise ValueError("the rows of a batch must share temperature, top_p and repetition_penalty")
        if len(rows) > 1 and any(row.params.seed is not None for row in rows):
            raise ValueError("a row with a seed must be alone in its batch")
        started = time.perf_counter()
        batch = self.processor.batchify([row.sample for row in rows]).to(self.model.device, dtype=self.model.dtype)
        prompt_len = batch.input_ids.shape[1]
        limit = self.model.config.language_config.max_position_embeddings
        max_new = min(max(row.params.max_new_tokens for row in rows), limit - prompt_len)
        hidden = [self.processor.eos_id, self.processor.pad_id]
        streams = [TextStream(self.tokenizer, hidden, row.params.stop, row.on_text) for row in rows]
        rows_end = RowsEnd(rows, streams, prompt_len, self.processor.eos_id)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
        sampling = params.temperature > 0
        image_inputs = dict(images=batch.images, images_seq_mask=batch.images_seq_mask,
                            images_spatial_crop=batch.images_spatial_crop)
        if self.chunk_size > 0:
            embeds, past = self.model.incremental_prefilling(input_ids=batch.input_ids,
                                                             attention_mask=batch.attention_mask,
                                                             chunk_size=self.chunk_size, **image_inputs)
        else:
            with torch.inference_mode():
                embeds, past = self.model.prepare_inputs_embeds(batch.input_ids, **image_inputs), None
        output = self.model.generate(
            inputs_embeds=embeds, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
            past_key_values=past, max_new_tokens=max_new, do_sample=sampling,
            temperature=params.temperature if sampling else 1.0, top_p=params.top_p if sampling else 1.0,
            repetition_penalty=params.repetition_penalty if sampling else 1.0,
            pad_token_id=self.processor.eos_id, bos_token_id=self.processor.bos_id,
            eos_token_id=self.processor.eos_id, streamer=BatchStream(streams, rows_end), stopping_criteria=[rows_end],
            generator=generator, use_cache=True, **image_inputs)
        results = []
        for index, (row, stream) in enumerate(zip(rows, streams)):
            new_ids = output[index, prompt_len:prompt_len + rows_end.lengths[index]].tolist()
            finished = stream.stopped or self.processor.eos_id in new_ids
            first = stream.first_token_time or stream.end_time or time.perf_counter()
            timings = Timings(prefill_ms=(first - started) * 1000, decode_tokens=max(len(new_ids) - 1, 0),
                              decode_s=(stream.end_time or first) - first)
            results.append(ChatResult(text=stream.text, token_ids=new_ids, prompt_tokens=len(row.sample),
                                      finish_reason="stop" if finished else "length",
                                      boxes=parse_grounding(stream.text), timings=timings))
        return results


@dataclass
class BatchRow:
    """One conversation of a `chat_batch` call: a sample from `ChatEngine.prepare_one`, its settings,
    a callback for its new text, and a flag the caller raises to end the row early."""
    sample: VLChatProcessorOutput
    params: GenerationParams
    on_text: Optional[Callable[[str], None]] = None
    is_cancelled: Callable[[], bool] = lambda: False


def sampling_key(params: GenerationParams) -> tuple:
    """What must be equal for two requests to share a batch (greedy ignores top_p and the penalty)."""
    if params.temperature <= 0:
        return ("greedy",)
    return (params.temperature, params.top_p, params.repetition_penalty)


class RowsEnd:
    """Stopping criterion of a batch: per row, ends it at EOS, at a stop string, after its own
    max_new_tokens or on cancellation, and remembers how many tokens each row generated."""

    def __init__(self, rows: Sequence[BatchRow], streams: Sequence[TextStream], prompt_len: int, eos_id: int):
        self.rows = rows
        self.streams = streams
        self.prompt_len = prompt_len
        self.eos_id = eos_id
        self.done = [False] * len(rows)
        self.lengths = [0] * len(rows)  # tokens generated by each row, its last (EOS, stop) included

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        generated = input_ids.shape[1] - self.prompt_len
        last_tokens = input_ids[:, -1].tolist()
        for index, (row, stream) in enumerate(zip(self.rows, self.streams)):
            if self.done[index]:
                continue
            self.lengths[index] = generated
            self.done[index] = (last_tokens[index] == self.eos_id or stream.stopped
                                or generated >= row.params.max_new_tokens or row.is_cancelled())
        return torch.tensor(self.done)


class BatchStream:
    """The streamer protocol for a batch: hands row i of every step's [B] tokens to stream i, skipping
    rows that have ended (the first put, the [B, T] prompt, goes to every stream)."""

    def __init__(self, streams: Sequence[TextStream], rows_end: RowsEnd):
        self.streams = streams
        self.rows_end = rows_end

    def put(self, value: torch.Tensor) -> None:
        for index, stream in enumerate(self.streams):
            if not self.rows_end.done[index]:
                stream.put(value[index])

    def end(self) -> None:
        for stream in self.streams:
            stream.end()


def add_engine_arguments(parser) -> None:
    """--chunk_size, --dtype and --device, as inference.py, the server and the web demo take them."""
    parser.add_argument("--chunk_size", type=int, default=-1,
                        help="prefill the prompt in chunks of this many tokens (-1: in one go; 512 bounds the memory)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
