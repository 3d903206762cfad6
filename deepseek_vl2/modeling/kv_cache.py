"""The decoder's key/value cache: the one owner of its layout and length, preallocated and written in place.

Attention produces each new token's entries and reads back what `update` returns; only this class
knows where entries live. Per layer it holds one tensor for the whole batch:
  * MLA (small, base): one [B, capacity, kv_lora_rank + qk_rope_head_dim] tensor: the normalised
    latent c_kv followed by the rotated shared rope key k_pe (576 values per token for the releases);
  * MHA (tiny): keys (after RoPE) and values stacked, [B, 2, heads, capacity, head_dim].

Writes go to absolute positions (indexed by a device tensor), so a decode step with a
fixed capacity needs no host synchronisation and can be captured in a CUDA graph:

    entries = cache.update(layer, positions, new, kv_len)   # write, then the first kv_len slots
    view = cache.layer(i)   # the same for one layer (write / read / update), for code compiled per
                            # layer kind: a LayerCache is a plain object, so one graph serves all layers

For code written against the reference's legacy format (a tuple over layers of 2-tuples, the
sequence on dim 2) the cache also behaves like one: `cache[i]` is `(k_pe [B,1,L,64], c_kv
[B,1,L,512])` for MLA and `(keys, values)` for MHA, as views; `len(cache)` is the layer count.
`KVCache.from_legacy` accepts such tuples.
"""
from typing import Sequence

import torch

from .language_config import DeepseekV2Config


class LayerCache:
    """One layer's cache tensor and its sequence dim: where new entries go and what attention reads."""

    __slots__ = ("storage", "seq_dim")

    def __init__(self, storage: torch.Tensor, seq_dim: int):
        self.storage, self.seq_dim = storage, seq_dim

    def write(self, positions: torch.Tensor, new: torch.Tensor) -> None:
        """Store `new` (entries of S tokens) at cache slots `positions`: [S], the same slots for every
        row, or [B, S], each row its own slots (continuous batching: rows of different lengths)."""
        if positions.dim() == 2:
            self.write_rows(positions, new)
            return
        self.storage[(slice(None),) * self.seq_dim + (positions,)] = new.to(self.storage.dtype)

    def write_rows(self, positions: torch.Tensor, new: torch.Tensor) -> None:
        """Store `new` (S tokens' entries per row) at slots `positions` [B, S] of each row: a scatter
        along the sequence dim, fixed shapes and no host read (CUDA-graph safe)."""
        B, S = positions.shape
        shape = [B] + [1] * (new.dim() - 1)
        shape[self.seq_dim] = S
        index = positions.reshape(shape).expand(new.shape)
        self.storage.scatter_(self.seq_dim, index, new.to(self.storage.dtype))

    def read(self, length: int) -> torch.Tensor:
        """The entries of the first `length` slots (a view)."""
        return self.storage.narrow(self.seq_dim, 0, length)

    def update(self, positions: torch.Tensor, new: torch.Tensor, length: int) -> torch.Tensor:
        self.write(positions, new)
        return self.read(length)


class KVCache:
    def __init__(self, config: DeepseekV2Config, batch_size: int, capacity: int, device, dtype):
        """`device`: one device for every layer, or a sequence with each layer's device (a model
        spread over several devices keeps each layer's cache next to the layer)."""
        self.config = config
        self.batch_size = batch_size
        if isinstance(device, (list, tuple)):
            if len(device) != config.num_hidden_layers:
                raise ValueError(f"KVCache got {len(device)} devices for {config.num_hidden_layers} layers")
            self.layer_devices = [torch.device(d) for d in device]
        else:
            self.layer_devices = [torch.device(device)] * config.num_hidden_layers
        self.device = self.layer_devices[0]
        self.dtype = dtype
        self.length = 0  # tokens written (the same for every row; padding is masked, not skipped)
        self.storage = [self._allocate(capacity, d) for d in self.layer_devices]  # one tensor per layer

    @property
    def seq_dim(self) -> int:
        return 1 if self.config.use_mla else 3

    @property
    def capacity(self) -> int:
        return self.storage[0].shape[self.seq_dim]

    def layer(self, index: int) -> LayerCache:
        return LayerCache(self.storage[index], self.seq_dim)

    def update(self, layer: int, positions: torch.Tensor, new: torch.Tensor, length: int) -> torch.Tensor:
        """Write `new` (the entries attention made for S tokens) at slots `positions` [S] of `layer`;
        return that layer's entries for the first `length` slots, which attention reads."""
        return self.layer(layer).update(positions, new, length)

    def _allocate(self, capacity: int, device: torch.device) -> torch.Tensor:
        # zeros, not empty: unwritten slots are read (and masked) by fixed-capacity decode steps,
        # and masked garbage could still be NaN, which survives multiplication by a zero weight
        c, B = self.config, self.batch_size
        kw = dict(device=device, dtype=self.dtype)
        if c.use_mla:
            return torch.zeros(B, capacity, c.kv_lora_rank + c.qk_rope_head_dim, **kw)
        head_dim = c.hidden_size // c.num_attention_heads
        return torch.zeros(B, 2, c.num_key_value_heads, capacity, head_dim, **kw)

    def reserve(self, needed: int) -> None:
        """Grow every layer's storage (doubling) so that `needed` tokens fit."""
        if needed <= self.capacity:
            return
        new_capacity = max(needed, 2 * self.capacity)
        grown = []
        for old in self.storage:
            fresh = self._allocate(new_capacity, old.device)
            fresh.narrow(self.seq_dim, 0, self.length).copy_(old.narrow(self.seq_dim, 0, self.length))
            grown.append(fresh)
        self.storage = grown

    def rows(self, start: int, count: int) -> "KVCache":
        """A cache over rows [start, start + count) that shares this one's storage (writes go through),
        with its own length (0). It must stay within the capacity: `reserve` beyond it would give the
        view storage of its own. The continuous-batching engine prefills a request into its row and
        decodes the rows in use through such views."""
        view = object.__new__(KVCache)
        view.config, view.layer_devices, view.device, view.dtype = (self.config, self.layer_devices, self.device,
                                                                    self.dtype)
        view.batch_size, view.length = count, 0
        view.storage = [t.narrow(0, start, count) for t in self.storage]
        return view

    def copy_from(self, other: "KVCache") -> "KVCache":
        """Take over `other`'s tokens (same model and batch size; capacity permitting)."""
        self.reserve(other.length)
        for mine, theirs in zip(self.storage, other.storage):
            mine.narrow(self.seq_dim, 0, other.length).copy_(theirs.narrow(self.seq_dim, 0, other.length))
        self.length = other.length
        return self

    # ---- the legacy tuple-of-tuples view -------------------------------------------------------

    def __len__(self) -> int:
        return len(self.storage)

    def __getitem__(self, layer_idx: int):
        L = self.length
        if self.config.use_mla:
            latent = self.storage[layer_idx]
            r = self.config.kv_lora_rank
            return latent[:, None, :L, r:], latent[:, None, :L, :r]
        keys_values = self.storage[layer_idx]
        return keys_values[:, 0, :, :L], keys_values[:, 1, :, :L]

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def to_legacy(self):
        return tuple(self)

    def crop(self, length: int) -> "KVCache":
        """Forget everything after the first `length` tokens."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} tokens to {length}")
        self.length = length
        return self

    def reorder(self, beam_idx: torch.Tensor) -> "KVCache":
        """Select batch rows (beam search's `_reorder_cache`)."""
        self.storage = [t.index_select(0, beam_idx.to(t.device)) for t in self.storage]
        self.batch_size = self.storage[0].shape[0]
        return self

    @classmethod
    def from_legacy(cls, past: Sequence, config: DeepseekV2Config, extra_capacity: int = 0) -> "KVCache":
        """Build a cache from the reference's per-layer (elem0, elem1) tuples."""
        if len(past) != config.num_hidden_layers:
            raise ValueError(
                f"past_key_values has {len(past)} layers, the model has {config.num_hidden_layers}"
            )
        first = past[0][0]
        length = first.shape[2]
        devices = [layer[0].device for layer in past]  # each layer's cache stays where it was
        cache = cls(config, first.shape[0], length + extra_capacity, devices, first.dtype)
        for i, (elem0, elem1) in enumerate(past):
            if config.use_mla:
                expected = (first.shape[0], 1, length)
                if tuple(elem0.shape[:3]) != expected or tuple(elem1.shape[:3]) != expected:
                    raise ValueError(f"past_key_values[{i}] has shapes {tuple(elem0.shape)}, {tuple(elem1.shape)}; "
                                     f"expected (k_pe [B,1,L,{config.qk_rope_head_dim}], c_kv [B,1,L,{config.kv_lora_rank}])")
                cache.storage[i][:, :length] = torch.cat((elem1[:, 0], elem0[:, 0]), dim=-1)
            else:
                cache.storage[i][:, :, :, :length] = torch.stack((elem0, elem1), dim=1)
        cache.length = length
        return cache
