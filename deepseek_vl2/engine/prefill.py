"""Prefill for the continuous engine: a request's images through the vision tower, its prompt into
the slots' prompt row, then into its slot with its first token. One request at a time, in
admission order, on the engine's thread.

While rows are decoding and few requests wait, a prefill advances in pieces so that no row waits
long for its next token (`piece`, one per engine iteration, before its decode step): first
`vision_blocks` blocks of the vision tower over the request's tiles (vision.TowerPieces, the same
features to the bit), then a few decoder layers over its whole prompt (about `layer_tokens` prompt
tokens x layers: a 2054-token prompt two layers a piece, a short prompt all of them at once).
Otherwise the first request is prefilled whole in one iteration (`whole`): nobody waits for it when
no row is decoding, and when many requests wait, serving the queue faster matters more than the
running rows' next tokens (the engine decides, continuous.py).

On CUDA the decoder's layers over a prompt replay CUDA graphs captured at start-up (prompt_graphs.py);
elsewhere they run eagerly (layer_pieces.LayerPieces, in forwards of `chunk` tokens, the same cache
and logits to the bit as a forward of the prompt).

Why pieces of layers, not chunks of tokens riding the decode steps (as this engine did before): a
chunk of a few hundred prompt tokens routes over every expert of an MoE layer, so a decode step
that carries one reads all expert weights, and a 2054-token prompt in 256-token chunks read them
eight times. Measured on an H200 over HTTP (serve_bench.py; benchmarks/RESULTS.md, eighth
session), layers from graphs against chunks in steps, in one call: 32 clients 2338 against 1871
output tok/s (tiny) and 1311 against 1135 (small); the open-loop inter-token p99 on small 12.2
against 17.7 ms (on tiny 9.5 against 6.8, at a rate 25% higher).

A finished prefill goes back to the engine as `Prefilled` (`take_ended`): the request and its first
token, chosen on the device and fed to its first decode step from there, or the error.

Tried and measured slower (H200, tiny, 32 clients): a worker thread prefilling on a CUDA stream of
its own beside decode steps on a stream of higher priority. The decode steps that shared the GPU
with a prefill took ~5x longer, output fell from 1560 to 1408 tok/s and the open-loop inter-token
p99 rose from 4.3 to 7.1 ms (benchmarks/RESULTS.md).
"""
from dataclasses import dataclass
from typing import List, Optional, Union

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

    chunk: int = 512  # prompt tokens per forward of an eager prefill (no CUDA graphs)
    vision_blocks: int = 4  # vision-tower blocks (SigLIP has 27) per iteration while rows decode
    layer_tokens: int = 4096  # prompt tokens x decoder layers per iteration while rows decode (at least one layer)
    device: Optional[str] = None  # another device (a second GPU) that prefills every prompt (prefill_thread.py)
    # or: SMs of the decoding GPU that prefill every prompt beside the steps (prefill_thread.py); "auto": half
    # of them, a multiple of 8, where the GPU can set SMs aside and no `device` is given
    # (prefill_thread.auto_prefill_sms), else prefill between the steps; None: prefill between the steps
    sms: Union[int, str, None] = None

    def __post_init__(self):
        for name in ("chunk", "vision_blocks", "layer_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sms is not None and self.sms != "auto" and (isinstance(self.sms, bool) or not isinstance(self.sms, int)
                                                            or self.sms < 1):
            raise ValueError(f"sms must be a number of SMs >= 1, 'auto' or None, got {self.sms!r}")
        if self.device is not None and self.sms not in (None, "auto"):
            raise ValueError(f"prompts are prefilled on another device ({self.device}) or on some SMs of the "
                             f"decoding GPU (sms={self.sms}), not both")


def parse_prefill_sms(text: str) -> Union[int, str, None]:
    """A command line's `--prefill-sms`: "auto", "off" (None: prefill between the decode steps) or a
    number of SMs >= 1. Raises ValueError naming the value otherwise."""
    text = text.strip().lower()
    if text == "auto":
        return "auto"
    if text == "off":
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"--prefill-sms takes auto, off or a number of SMs >= 1, not {text!r}")
    return int(text)


@dataclass
class Prefilled:
    """A request whose prefill ended: `first` its first token (a Chosen), or `error`."""

    request: ActiveRequest
    first: Optional[Chosen] = None
    error: Optional[Exception] = None


class Prefill:
    """The admitted requests not decoding yet (`requests`, in admission order) and their prefill."""

    def __init__(self, engine, settings: PrefillSettings, graphs: Optional[PromptGraphs] = None):
        self.model, self.lm, self.slots = engine.model, engine.lm, engine.slots
        self.histories, self.next_tokens = engine.histories, engine.next_tokens
        self.stats, self.settings = engine.stats, settings
        self.graphs = graphs  # on CUDA: the decoder's layers over a prompt, as graphs
        self.requests: List[ActiveRequest] = []
        self._ended: List[Prefilled] = []

    @property
    def prompt_graphs(self) -> int:
        """Decoder-layer graphs captured for prompts (0 without CUDA graphs)."""
        return len(self.graphs.graphs) if self.graphs is not None else 0

    tower_graphs = 0  # the vision tower runs eagerly here (in pieces, vision.TowerPieces)

    def add(self, request: ActiveRequest) -> None:
        """An admitted request, prefilled after those before it."""
        self.requests.append(request)

    def close(self) -> None:
        """Nothing to stop: this prefill runs on the engine's thread."""

    def take_ended(self) -> List[Prefilled]:
        """The prefills that ended since the last call (they have left `requests`)."""
        ended, self._ended = self._ended, []
        return ended

    def whole(self) -> None:
        """Prefill the first request whole (what is left of its images and its decoder layers)."""
        if not self.requests:
            return
        request = self.requests[0]
        try:
            self._embeddings(request, blocks=None)
            layers = self._layers(request)
            self._end(request, layers.advance(layers.layers_left))
        except Exception as error:
            self.fail(request, error)

    def piece(self) -> None:
        """The first request's next piece while rows decode: `vision_blocks` blocks of its vision
        tower, or once its embeddings are made, about `layer_tokens` / prompt tokens decoder layers;
        after its last layer, its prefill ends."""
        if not self.requests:
            return
        request = self.requests[0]
        try:
            tower_pieces = self.stats.tower_pieces
            if self._embeddings(request, blocks=self.settings.vision_blocks) is None:
                return
            if self.stats.tower_pieces != tower_pieces:  # the tower's last piece ran now: one piece per iteration
                return
            self.stats.layer_pieces += 1
            logits = self._layers(request).advance(max(1, round(self.settings.layer_tokens / request.prompt_len)))
            if logits is not None:
                self._end(request, logits)
        except Exception as error:
            self.fail(request, error)

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

    def _layers(self, request: ActiveRequest):
        """The request's prompt through the decoder in pieces of layers, in the prompt row: replayed
        from the prompt graphs where there are some, else eager."""
        if request.layers is None:
            if self.graphs is not None:
                request.layers = GraphLayerPieces(self.graphs, request.embeds)
            else:
                request.layers = LayerPieces(self.lm, request.embeds, self.slots.prompt_row(0), self.settings.chunk)
        return request.layers

    def _end(self, request: ActiveRequest, logits: torch.Tensor) -> None:
        """The prompt is in the prompt row: into the request's slot, and its first token chosen on the
        device and fed to its first decode step from there (the engine reads it one iteration later)."""
        self.slots.take_prompt(request.slot, request.prompt_len)
        request.embeds = request.layers = None
        self.requests.remove(request)
        self._ended.append(first_token(request, logits, self.histories, self.next_tokens))


def first_token(request: ActiveRequest, logits: torch.Tensor, histories, next_tokens: torch.Tensor) -> Prefilled:
    """A request whose prompt is in its slot: its first token chosen from the prompt's last `logits`
    [1, vocab] on the device and fed to its first decode step from there (`next_tokens`; the engine
    reads the token one iteration later)."""
    request.length = request.prompt_len
    slot = device_tensor([request.slot], next_tokens.device)
    token, unusable = choose_tokens(logits, [request.sampler], slot, histories)
    next_tokens.index_copy_(0, slot, token)
    return Prefilled(request, first=Chosen([request], token, unusable))
