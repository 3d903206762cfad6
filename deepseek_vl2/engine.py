"""A chat engine over processor + model: conversation and images in, streamed answer out.

`inference.py`, the HTTP server and the web demo all answer through this class:

    engine = ChatEngine.load("deepseek-ai/deepseek-vl2-tiny")
    result = engine.chat(conversation, images, GenerationParams(max_new_tokens=256), on_text=print)
    result.text, result.boxes, result.timings

It prepares the prompt with the processor, prefills (chunked with `chunk_size`, as
`incremental_prefilling`), and generates with the reference's `inference.py` recipe: `generate`
gets the prompt ids too, so the repetition penalty covers them (P-GEN-1).
"""
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence

import torch
from PIL import Image

from .grounding import GroundedBox, parse_grounding
from .models import DeepseekVLV2ForCausalLM, DeepseekVLV2Processor


@dataclass
class GenerationParams:
    max_new_tokens: int = 512
    temperature: float = 0.4  # <= 0 means greedy
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    seed: Optional[int] = None
    stop: Sequence[str] = ()


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


class StopWhenStreamStops:
    """Stopping criterion: end generation once the stream has hit a stop string."""

    def __init__(self, stream: TextStream):
        self.stream = stream

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return self.stream.stopped


class ChatEngine:
    def __init__(self, model: DeepseekVLV2ForCausalLM, processor: DeepseekVLV2Processor, chunk_size: int = -1):
        if chunk_size == 0 or chunk_size < -1:
            raise ValueError(f"chunk_size must be -1 (no chunking) or a positive integer, got {chunk_size}")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.chunk_size = chunk_size

    @classmethod
    def load(cls, model_path: str, device: Optional[str] = None, dtype=None, chunk_size: int = -1) -> "ChatEngine":
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        processor = DeepseekVLV2Processor.from_pretrained(model_path)
        model = DeepseekVLV2ForCausalLM.from_pretrained(model_path, dtype=dtype, device_map=device)
        return cls(model, processor, chunk_size)

    def prepare(self, conversation: list, images: List[Image.Image]):
        """Processor output for one conversation, on the model's device (images in its dtype)."""
        batch = self.processor(conversations=conversation, images=images, force_batchify=True, system_prompt="")
        limit = self.model.config.language_config.max_position_embeddings
        if batch.input_ids.shape[1] >= limit:
            raise ValueError(f"the prompt is {batch.input_ids.shape[1]} tokens, beyond the model's context of "
                             f"{limit}; use fewer or smaller images or a shorter conversation")
        return batch.to(self.model.device, dtype=self.model.dtype)

    def chat(self, conversation: list, images: List[Image.Image], params: GenerationParams = GenerationParams(),
             on_text: Optional[Callable[[str], None]] = None) -> ChatResult:
        started = time.perf_counter()
        batch = self.prepare(conversation, images)
        prompt_len = batch.input_ids.shape[1]
        max_new = min(params.max_new_tokens, self.model.config.language_config.max_position_embeddings - prompt_len)
        hidden = [self.processor.eos_id, self.processor.pad_id]
        stream = TextStream(self.tokenizer, hidden, params.stop, on_text)
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
            eos_token_id=self.processor.eos_id, streamer=stream, stopping_criteria=[StopWhenStreamStops(stream)],
            generator=generator, use_cache=True, **image_inputs)
        new_ids = output[0, prompt_len:].tolist()
        finished = stream.stopped or self.processor.eos_id in new_ids
        first = stream.first_token_time or stream.end_time or time.perf_counter()
        timings = Timings(prefill_ms=(first - started) * 1000, decode_tokens=max(len(new_ids) - 1, 0),
                          decode_s=(stream.end_time or first) - first)
        return ChatResult(text=stream.text, token_ids=new_ids, prompt_tokens=prompt_len,
                          finish_reason="stop" if finished else "length", boxes=parse_grounding(stream.text),
                          timings=timings)
