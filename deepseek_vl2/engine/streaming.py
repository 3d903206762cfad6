"""Streaming: generated ids -> text pieces per row (`TextStream`, `BatchStream`) and per-row ends (`RowsEnd`).

`TextStream` and `BatchStream` follow the transformers streamer protocol (`put` / `end`); `RowsEnd`
is the batch's stopping criterion.
"""
import time
from functools import partial
from typing import Callable, List, Optional, Sequence

import torch

WINDOW_CONTEXT_IDS = 4  # decoded ids kept in front of the new ones (see TextStream)
MAX_PENDING_IDS = 8  # a UTF-8 character is at most 4 bytes: ids that stay undecodable longer are shown as U+FFFD


def text_decoder(tokenizer) -> Callable[[List[int]], str]:
    """`ids -> tokenizer.decode(ids, skip_special_tokens=False)`. A fast tokenizer that does not clean
    up spaces decodes to the same text through its backend (`backend_tokenizer`) directly, without
    the wrapper's conversions: a few microseconds less per call, and a stream decodes twice per
    token on the engine's thread."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", None) is False:
        return partial(backend.decode, skip_special_tokens=False)
    return partial(tokenizer.decode, skip_special_tokens=False)


class TextStream:
    """The transformers streamer protocol (`put` / `end`) for one sequence: keeps the generated ids,
    decodes them incrementally, hands each new piece of text to `on_text`, cuts at stop strings.

    Decoding looks only at a short window of recent ids: the text of `ids[prefix:]` minus the text
    of `ids[prefix:read]` is what the newest ids added (the window starts a few ids back, so that
    tokenizers that decode a leading space differently at the start of a sequence agree), and a
    window whose text ends in an incomplete UTF-8 sequence (U+FFFD) waits for the next id. Text that
    could be the start of a stop string is held back until it either completes the stop string
    (then it is never shown) or stops matching; what is still held when the row ends is shown then.
    `text` is the whole answer, cut before the first stop string."""

    def __init__(self, tokenizer, hidden_ids: Sequence[int], stop: Sequence[str] = (),
                 on_text: Optional[Callable[[str], None]] = None):
        self._decode = text_decoder(tokenizer)
        self.hidden_ids = set(hidden_ids)
        self.stop = [s for s in stop if s]
        self.on_text = on_text
        self.ids: List[int] = []
        self.text = ""
        self.stopped = False
        self.first_token_time = None
        self.end_time = None
        self._prompt_seen = False
        self._shown: List[int] = []  # the ids that are decoded (hidden ids left out)
        self._prefix = 0  # the decode window: _shown[_prefix:_read] is decoded text, _shown[_read:] not yet
        self._read = 0
        self._emitted = 0  # characters of `text` handed to on_text
        self._searched = 0  # `text` before this has no stop string starting in it

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first put is the prompt
            self._prompt_seen = True
            return
        self.add(value.reshape(-1).tolist())

    def add(self, new_ids: List[int]) -> None:
        """Newly generated ids (what `put` does after the prompt, without a tensor)."""
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
        if self.stopped:
            return
        self.ids.extend(new_ids)
        self._shown.extend(t for t in new_ids if t not in self.hidden_ids)
        if len(self._shown) == self._read:
            return
        before = self._decode(self._shown[self._prefix:self._read])
        after = self._decode(self._shown[self._prefix:])
        waiting = len(self._shown) - self._read < MAX_PENDING_IDS
        if waiting and (after.endswith("\ufffd") or not after.startswith(before)):
            return  # an incomplete UTF-8 sequence (or a window that does not agree yet): wait
        if not after.startswith(before):  # never seen with byte-level BPE; show the new window whole
            before = ""
        self._prefix, self._read = max(self._read - WINDOW_CONTEXT_IDS, 0), len(self._shown)
        self._add(after[len(before):])

    def _add(self, piece: str) -> None:
        self.text += piece
        longest = max((len(s) for s in self.stop), default=0)
        if longest:
            start = max(self._searched - longest + 1, 0)
            found = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if found:
                self.text, self.stopped = self.text[:min(found)], True
                self._show(len(self.text))
                return
            self._searched = len(self.text)
        self._show(len(self.text) - self._held_back())

    def _held_back(self) -> int:
        """The length of the longest end of `text` that is the start of a stop string."""
        for length in range(min(max((len(s) for s in self.stop), default=1) - 1, len(self.text)), 0, -1):
            tail = self.text[-length:]
            if any(s.startswith(tail) for s in self.stop):
                return length
        return 0

    def _show(self, end: int) -> None:
        if end > self._emitted:
            if self.on_text is not None:
                self.on_text(self.text[self._emitted:end])
            self._emitted = end

    def end(self) -> None:
        """The row has ended: show what was held back for a stop string that never came."""
        self._show(len(self.text))
        self.end_time = time.perf_counter()


class RowsEnd:
    """Stopping criterion of a batch: per row, ends it at EOS, at a stop string, after its own
    max_new_tokens or on cancellation, and remembers how many tokens each row generated.

    `rows` are the batch's `BatchRow`s (their `params.max_new_tokens` and `is_cancelled` are read)."""

    def __init__(self, rows: Sequence, streams: Sequence[TextStream], prompt_len: int, eos_id: int):
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
