"""A chat engine over processor + model: conversation and images in, streamed answer out.

`inference.py`, the HTTP server and the web demo all answer through this class:

    engine = ChatEngine.load("deepseek-ai/deepseek-vl2-tiny")
    result = engine.chat(conversation, images, GenerationParams(max_new_tokens=256), on_text=print)
    result.text, result.boxes, result.timings

It prepares the prompt with the processor, prefills (chunked with `chunk_size`, as
`incremental_prefilling`), and generates with the reference's `inference.py` recipe: `generate`
gets the prompt ids too, so the repetition penalty covers them (kept from the official package:
docs/deviations.md#kept-on-purpose).

`chat` answers one conversation through `generate` (its CUDA fast path, warmed up at load).
`chat_batch` answers several at once: on one device through a continuous-batching engine
(engine/continuous.py) kept on this ChatEngine, so rows may differ in every setting; a model spread
over several GPUs answers them as one left-padded `generate` batch (rows with one set of sampling
settings, a seeded row alone).
"""
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from PIL import Image

from ..grounding import GroundedBox, parse_grounding
from ..models import DeepseekVLV2ForCausalLM
from ..processing import DeepseekVLV2Processor, VLChatProcessorOutput
from .loading import load_model_and_processor
from .params import GenerationParams, sampling_key
from .streaming import BatchStream, RowsEnd, TextStream


class PromptTooLongError(ValueError):
    """The prompt (text and image tokens) does not fit the model's context."""


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
    finish_reason: str  # "stop" (EOS or a stop string), "length", or "cancelled" (chat_batch's is_cancelled)
    boxes: List[GroundedBox] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)


class ChatEngine:
    def __init__(self, model: DeepseekVLV2ForCausalLM, processor: DeepseekVLV2Processor, chunk_size: int = -1):
        if chunk_size == 0 or chunk_size < -1:
            raise ValueError(f"chunk_size must be -1 (no chunking) or a positive integer, got {chunk_size}")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.chunk_size = chunk_size
        self._continuous = None  # chat_batch's continuous-batching engine, made at its first call

    @classmethod
    def from_args(cls, model_path: str, args) -> "ChatEngine":
        """Load with the options `add_engine_arguments` put on a command line."""
        return cls.load(model_path, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
                        chunk_size=args.chunk_size, quantization=args.quantization)

    @classmethod
    def load(cls, model_path: str, device: Optional[str] = None, dtype=None, chunk_size: int = -1,
             quantization=None) -> "ChatEngine":
        """Processor and model through `load_model_and_processor` (CUDA when available; bf16 there, else
        fp32; `quantization` "int8" / "int4" or a QuantizationConfig quantizes the language model while
        loading)."""
        processor, model = load_model_and_processor(model_path, device=device, dtype=dtype, quantization=quantization)
        return cls(model, processor, chunk_size)

    def prepare_one(self, conversation: list, images: List[Image.Image]):
        """One processed (unbatched) sample for `chat_batch`; ValueError when the prompt does not fit
        the context or the conversation is malformed."""
        return prepare_sample(self.processor, conversation, images,
                              self.model.config.language_config.max_position_embeddings)

    def chat(self, conversation: list, images: List[Image.Image], params: Optional[GenerationParams] = None,
             on_text: Optional[Callable[[str], None]] = None) -> ChatResult:
        params = params if params is not None else GenerationParams()
        return self.generate_batch([BatchRow(self.prepare_one(conversation, images), params, on_text)])[0]

    def chat_batch(self, rows: Sequence["BatchRow"]) -> List[ChatResult]:
        """Answer several prepared conversations at once, each as `chat` would answer it alone (greedy
        and seeded rows exactly on the CPU; on a GPU up to bf16 near-ties).

        On one device the rows go through the continuous-batching engine (made at the first call with
        room for the rows, on CUDA with its decode graphs, and kept for later calls); rows may differ
        in every setting. Each row ends on its own: at EOS, at one of its stop strings, after its
        max_new_tokens (capped by what its own prompt leaves of the context), or at the step after
        its `is_cancelled()` turns true (finish_reason "cancelled"). An error in one row (its on_text raising included) is raised
        after the others have ended. A model spread over several devices answers through
        `generate_batch`, with its rules."""
        if not rows:
            raise ValueError("chat_batch needs at least one row")
        if self.model.language.is_split:
            return self.generate_batch(rows)
        engine = self.continuous_engine(len(rows))
        results: List[Optional[ChatResult]] = [None] * len(rows)
        errors = {}

        def events_of(index: int, row: "BatchRow"):
            def on_event(kind, value):
                if kind == "text" and row.on_text is not None:
                    row.on_text(value)
                elif kind == "done":
                    results[index] = value
                elif kind == "error":
                    errors[index] = value
            return on_event

        handles = [engine.submit(row.sample, row.params, events_of(i, row)) for i, row in enumerate(rows)]
        try:
            while engine.has_work():
                for row, handle in zip(rows, handles):
                    if not handle.finished and row.is_cancelled():
                        handle.cancel()
                engine.step()
        except BaseException:  # interrupted (KeyboardInterrupt in a notebook): no row is left for the next call
            for handle in handles:
                handle.cancel()
            engine.end_cancelled()
            raise
        errors.update({i: h.callback_error for i, h in enumerate(handles) if h.callback_error is not None})
        if errors:
            raise errors[min(errors)]
        return results

    def continuous_engine(self, rows: int):
        """The continuous-batching engine `chat_batch` runs on, with at least `rows` KV slots (a power
        of two, at least 8; made anew only when a call needs more)."""
        from .continuous import ContinuousEngine
        from .prefill import PrefillSettings

        engine = self._continuous
        if engine is None or engine.slots.max_num_seqs < rows:
            self._continuous = None  # free the old engine's cache before making the new one
            slots = max(8, 1 << (rows - 1).bit_length())
            prefill_chunk = self.chunk_size if self.chunk_size > 0 else self.model.config.language_config.max_position_embeddings
            self._continuous = ContinuousEngine(self.model, self.processor, max_num_seqs=slots,
                                                prefill=PrefillSettings(chunk=prefill_chunk))
        return self._continuous

    def generate_batch(self, rows: Sequence["BatchRow"]) -> List[ChatResult]:
        """Answer several prepared conversations as one left-padded `generate` batch.

        The rows share one set of sampling settings (temperature, top_p, repetition_penalty; a ValueError
        otherwise), and a seeded row must be alone, so that its seed reproduces the single-row result.
        Each row ends on its own: at EOS, at one of its stop strings, after its max_new_tokens, or when
        its `is_cancelled()` turns true; a row that has ended is padded while the others go on.
        A row's `max_new_tokens` is capped by what its own prompt leaves of the context; rows whose
        answers would not fit the context together (the longest prompt plus the largest capped
        max_new_tokens; the batch has one length) are a ValueError, never cut short."""
        if not rows:
            raise ValueError("generate_batch needs at least one row")
        params = rows[0].params
        if any(sampling_key(row.params) != sampling_key(params) for row in rows):
            raise ValueError("the rows of a batch must share temperature, top_p, repetition_penalty, top_k and "
                             "min_new_tokens")
        if len(rows) > 1 and any(row.params.seed is not None for row in rows):
            raise ValueError("a row with a seed must be alone in its batch")
        started = time.perf_counter()
        batch = self.processor.batchify([row.sample for row in rows]).to(self.model.device, dtype=self.model.dtype)
        prompt_len = batch.input_ids.shape[1]
        limit = self.model.config.language_config.max_position_embeddings
        max_new = max(min(row.params.max_new_tokens, limit - len(row.sample)) for row in rows)
        if max_new > limit - prompt_len:
            raise ValueError(f"these rows do not fit the context of {limit} tokens together: the longest prompt is "
                             f"{prompt_len} tokens and a row asks for {max_new} new tokens; batch them apart")
        hidden = [self.processor.eos_id, self.processor.pad_id]
        streams = [TextStream(self.tokenizer, hidden, row.params.stop, row.on_text) for row in rows]
        rows_end = RowsEnd(rows, streams, prompt_len, self.processor.eos_id)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(params.seed)
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
            past_key_values=past, max_new_tokens=max_new, **params.sampling_options(),
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


def prepare_sample(processor: DeepseekVLV2Processor, conversation: list, images: List[Image.Image], limit: int):
    """One processed sample of `conversation`; PromptTooLongError when it leaves no room for an answer
    within `limit` tokens."""
    sample = processor.process_one(conversations=conversation, images=images, system_prompt="")
    if len(sample) >= limit:
        raise PromptTooLongError(f"the prompt is {len(sample)} tokens, beyond the model's context of {limit}; "
                                 "use fewer or smaller images or a shorter conversation")
    return sample


@dataclass
class BatchRow:
    """One conversation of a `chat_batch` call: a sample from `ChatEngine.prepare_one`, its settings,
    a callback for its new text, and a flag the caller raises to end the row early."""
    sample: VLChatProcessorOutput
    params: GenerationParams
    on_text: Optional[Callable[[str], None]] = None
    is_cancelled: Callable[[], bool] = lambda: False
