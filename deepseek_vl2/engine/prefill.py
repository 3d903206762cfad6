"""Prefill for the continuous engine: a request's images through the vision tower, its prompt into
the slots' prompt row, then into its slot with its first token. One request at a time, in
admission order, on the engine's thread.

While rows are decoding and few requests wait, a prefill advances in pieces so that no row waits
long for its next token (`next_piece`): each engine iteration runs `vision_blocks` blocks of the
vision tower over the request's tiles (vision.TowerPieces, the same features to the bit), and once
its embeddings are made, either a few decoder layers over its whole prompt (layer_pieces.LayerPieces,
the same cache and logits to the bit; about `layer_tokens` prompt tokens x layers a piece) or, with
`layer_tokens` 0, a
chunk of up to `step_chunk` prompt tokens handed to the decode step, which runs it with the rows
(decode_steps.py). Otherwise the first request is prefilled whole in one iteration (`whole`, in
forwards of `chunk` tokens): nobody waits for it when no row is decoding, and when many requests
wait, serving the queue faster matters more than the running rows' next tokens (the engine
decides, continuous.py).

A finished prefill goes back to the engine as `Prefilled` (`take_ended`): the request and its first
token, chosen on the device and fed to its first decode step from there, or the error.

Tried and measured slower (H200, tiny, 32 clients): a worker thread prefilling on a CUDA stream of
its own beside decode steps on a stream of higher priority. The decode steps that shared the GPU
with a prefill took ~5x longer, output fell from 1560 to 1408 tok/s and the open-loop inter-token
p99 rose from 4.3 to 7.1 ms (benchmarks/RESULTS.md).
"""
from dataclasses import dataclass, fields
from typing import List, Optional

import torch

from ..modeling.layer_pieces import LayerPieces
from ..modeling.vision import TowerPieces
from .prompt_graphs import GraphLayerPieces, PromptGraphs
from .requests import ActiveRequest
from .row_sampling import Chosen, choose_tokens
from .slots import device_tensor


@dataclass(frozen=True)
class PrefillSettings:
    """How the continuous engine prefills prompts (see the module's docstring)."""

    chunk: int = 512  # prompt tokens per forward
    step_chunk: int = 256  # with layer_tokens 0: prompt tokens a decode step carries while rows decode
    vision_blocks: int = 4  # vision-tower blocks (SigLIP has 27) per iteration while rows decode
    # while rows decode, a piece runs round(layer_tokens / prompt tokens) decoder layers (at least one) over
    # the prompt: a 2054-token prompt 2 layers a piece, a short one all of them at once (0: chunks ride the steps)
    layer_tokens: int = 0

    def __post_init__(self):
        for field in fields(self):
            least = 0 if field.name == "layer_tokens" else 1
            if getattr(self, field.name) < least:
                raise ValueError(f"{field.name} must be >= {least}, got {getattr(self, field.name)}")


@dataclass
class Prefilled:
    """A request whose prefill ended: `first` its first token (a Chosen), or `error`."""

    request: ActiveRequest
    first: Optional[Chosen] = None
    error: Optional[Exception] = None


@dataclass
class Chunk:
    """Prompt tokens [start, end) of `request`, run inside a decode step."""

    request: ActiveRequest
    start: int
    end: int


class Prefill:
    """The admitted requests not decoding yet (`requests`, in admission order) and their prefill."""

    def __init__(self, engine, settings: PrefillSettings, graphs: Optional[PromptGraphs] = None):
        self.model, self.lm, self.slots = engine.model, engine.lm, engine.slots
        self.histories, self.next_tokens = engine.histories, engine.next_tokens
        self.stats, self.settings = engine.stats, settings
        self.chunk, self.vision_blocks, self.layer_tokens = settings.chunk, settings.vision_blocks, settings.layer_tokens
        self.step_chunk = min(settings.step_chunk, self.slots.capacity - 1)
        self.graphs = graphs  # with layer_tokens on CUDA: the decoder's layers over a prompt as graphs
        self.requests: List[ActiveRequest] = []
        self._ended: List[Prefilled] = []

    def take_ended(self) -> List[Prefilled]:
        """The prefills that ended since the last call (they have left `requests`)."""
        ended, self._ended = self._ended, []
        return ended

    def whole(self) -> None:
        """Prefill the first request whole (what is left of its images and prompt, in forwards of
        `chunk` tokens)."""
        if not self.requests:
            return
        request = self.requests[0]
        try:
            embeds = self._embeddings(request, blocks=None)
            if self.layer_tokens:
                pieces = self._layer_pieces(request)
                self._end(request, pieces.advance(pieces.layers_left))
                return
            cache = self.slots.prompt_row(request.prefilled)
            for start in range(request.prefilled, request.prompt_len, self.chunk):
                logits = self.lm(inputs_embeds=embeds[:, start : start + self.chunk], past_key_values=cache,
                                 use_cache=True, logits_to_keep=1).logits[:, -1]
            self._end(request, logits)
        except Exception as error:
            self.fail(request, error)

    def next_piece(self) -> Optional[Chunk]:
        """The first request's next piece while rows decode: `vision_blocks` blocks of its vision
        tower, or then a few layers of the decoder over its whole prompt, run now (None returned);
        or, with `layer_tokens` 0, once its embeddings are made, its next prompt chunk
        for the decode step to run (`chunk_ran` after)."""
        if not self.requests:
            return None
        request = self.requests[0]
        try:
            tower_pieces = self.stats.tower_pieces
            if self._embeddings(request, blocks=self.vision_blocks) is None:
                return None
            if self.layer_tokens:
                if self.stats.tower_pieces == tower_pieces:  # one piece per iteration
                    self._layer_piece(request)
                return None
        except Exception as error:
            self.fail(request, error)
            return None
        return Chunk(request, request.prefilled, min(request.prompt_len, request.prefilled + self.step_chunk))

    def _layer_piece(self, request: ActiveRequest) -> None:
        """The next few layers over the request's whole prompt (about `layer_tokens` prompt tokens x
        layers); after the last, the request's prefill ends."""
        self.stats.layer_pieces += 1
        logits = self._layer_pieces(request).advance(max(1, round(self.layer_tokens / request.prompt_len)))
        if logits is not None:
            self._end(request, logits)

    def _layer_pieces(self, request: ActiveRequest):
        """The request's prompt in pieces of layers, in the prompt row: replayed from the prompt graphs
        where there are some, else eager (LayerPieces, in forwards of `chunk` tokens)."""
        if request.layers is None:
            if self.graphs is not None:
                request.layers = GraphLayerPieces(self.graphs, request.embeds)
            else:
                request.layers = LayerPieces(self.lm, request.embeds, self.slots.prompt_row(0), self.chunk)
        return request.layers

    def chunk_ran(self, chunk: Chunk, logits: torch.Tensor) -> None:
        """The decode step ran `chunk`; `logits` [1, vocab] of its last token."""
        request = chunk.request
        request.prefilled = chunk.end
        if chunk.end == request.prompt_len:
            self._end(request, logits)

    def fail(self, request: ActiveRequest, error: Exception) -> None:
        if request in self.requests:
            self.requests.remove(request)
        request.embeds = request.images = request.layers = None
        self._ended.append(Prefilled(request, error=error))

    def _embeddings(self, request: ActiveRequest, blocks: Optional[int]) -> Optional[torch.Tensor]:
        """The request's prompt embeddings [1, T, hidden], made from its host inputs (copied without
        waiting for the device); with `blocks`, its images advance that many tower blocks per call
        and None is returned until the tower is through."""
        if request.embeds is not None:
            return request.embeds
        inputs = request.inputs
        if isinstance(inputs, torch.Tensor):  # token ids for a bare decoder
            request.embeds = self.lm.get_input_embeddings()(inputs.to(self.lm.device, non_blocking=True))
        elif request.images is None:
            prompt = self.model.image_prompt(inputs.input_ids, inputs.images, inputs.images_seq_mask,
                                             inputs.images_spatial_crop)
            if prompt.tiles is None:
                request.embeds = prompt.embeds
            else:
                request.images = (prompt, TowerPieces(self.model.vision, prompt.tiles))
        if request.images is not None:
            prompt, tower = request.images
            features = tower.advance(tower.blocks_left if blocks is None else blocks)
            self.stats.tower_pieces += blocks is not None
            if features is None:
                return None
            request.embeds, request.images = self.model.place_images(prompt, features), None
        request.inputs = None
        return request.embeds

    def _end(self, request: ActiveRequest, logits: torch.Tensor) -> None:
        """The prompt is in the prompt row: into the request's slot, and its first token chosen on the
        device and fed to its first decode step from there (the engine reads it one iteration later)."""
        self.slots.take_prompt(request.slot, request.prompt_len)
        request.prefilled = request.length = request.prompt_len
        request.embeds = request.layers = None
        slot = device_tensor([request.slot], self.next_tokens.device)
        token, unusable = choose_tokens(logits, [request.sampler], slot, self.histories)
        self.next_tokens.index_copy_(0, slot, token)
        self.requests.remove(request)
        self._ended.append(Prefilled(request, first=Chosen([request], token, unusable)))
