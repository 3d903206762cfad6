"""Prefill for the continuous engine: a request's images through the vision tower, its prompt into
its KV slot, then its first token; on the engine's thread, between two decode steps, up to `chunk`
prompt tokens per iteration (a prompt that fits a chunk is prefilled whole).

A finished prefill goes back to the engine as `Prefilled` (the request and its first token, chosen
on the device and fed to its first decode step from there, or the error).

Tried and measured slower (H200, tiny, 32 clients): a worker thread prefilling on a CUDA stream of
its own beside decode steps on a stream of higher priority. The decode steps that shared the GPU
with a prefill took ~5x longer, output fell from 1560 to 1408 tok/s and the open-loop inter-token
p99 rose from 4.3 to 7.1 ms (benchmarks/RESULTS.md).
"""
from dataclasses import dataclass
from typing import List, Optional

import torch

from .requests import ActiveRequest
from .row_sampling import Chosen, choose_tokens
from .slots import device_tensor


@dataclass
class Prefilled:
    """A request whose prefill ended: `first` its first token (a Chosen), or `error`."""

    request: ActiveRequest
    first: Optional[Chosen] = None
    error: Optional[Exception] = None


class Prefill:
    """The admitted requests not decoding yet (`requests`, in admission order) and their prefill,
    `chunk` prompt tokens per engine iteration."""

    def __init__(self, engine, chunk: int):
        self.model, self.lm = engine.model, engine.lm
        self.histories, self.next_tokens = engine.histories, engine.next_tokens
        self.chunk = chunk
        self.requests: List[ActiveRequest] = []

    def run(self) -> List[Prefilled]:
        """One iteration's prefill: requests in admission order until `chunk` tokens are spent; a
        prompt that fits a chunk is not split (when what is left of the budget cannot take the rest of
        it, it waits for the next iteration). The requests returned have left `requests`."""
        done, budget = [], self.chunk
        for request in list(self.requests):
            left = request.prompt_len - request.prefilled
            if budget <= 0 or (left > budget and budget < self.chunk):
                break
            tokens = min(left, budget)
            budget -= tokens
            try:
                logits = self.forward(request, tokens)
                if request.prefilled < request.prompt_len:
                    continue
                done.append(Prefilled(request, first=self.first_token(request, logits)))
            except Exception as error:
                done.append(Prefilled(request, error=error))
            self.requests.remove(request)
        return done

    def embeddings(self, inputs) -> torch.Tensor:
        """Prompt embeddings [1, T, hidden] (images merged, through the vision tower and projector),
        from host tensors (copied without waiting for the device)."""
        if isinstance(inputs, torch.Tensor):  # token ids for a bare decoder
            return self.lm.get_input_embeddings()(inputs.to(self.lm.device, non_blocking=True))
        return self.model.prepare_inputs_embeds(inputs.input_ids, inputs.images, inputs.images_seq_mask,
                                                inputs.images_spatial_crop)

    def forward(self, request: ActiveRequest, tokens: int) -> torch.Tensor:
        """Prefill up to `tokens` more prompt tokens into the request's slot (its images through the
        vision tower at its first chunk); the last position's logits [1, vocab]."""
        if request.embeds is None:
            request.embeds, request.inputs = self.embeddings(request.inputs), None
        start = request.prefilled
        end = min(request.prompt_len, start + tokens)
        logits = self.lm(inputs_embeds=request.embeds[:, start:end], past_key_values=request.cache,
                         use_cache=True, logits_to_keep=1).logits[:, -1]
        request.prefilled = request.length = end
        if end == request.prompt_len:
            request.embeds = None
        return logits

    def first_token(self, request: ActiveRequest, logits: torch.Tensor) -> Chosen:
        """The request's first token, chosen on the device and fed to its first decode step from
        there (`next_tokens`); the engine reads it one iteration later."""
        slot = device_tensor([request.slot], self.next_tokens.device)
        token, unusable = choose_tokens(logits, [request.sampler], slot, self.histories)
        self.next_tokens.index_copy_(0, slot, token)
        return Chosen([request], token, unusable)
