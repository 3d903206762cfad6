"""The DeepSeek-V2 / DeepSeekMoE decoder of DeepSeek-VL2.

    DeepseekV2ForCausalLM
      model: DeepseekV2Model
        embed_tokens -> layers[i]: DecoderLayer -> norm
          DecoderLayer: x + attention(RMSNorm(x)); then + mlp(RMSNorm(.))
            attention: MultiHeadAttention (use_mla false) | MultiHeadLatentAttention
            mlp: GatedMLP (dense layers) | MoE (routed + shared experts)
      lm_head

`forward` keeps the reference's interface (float32 logits for every position unless
`logits_to_keep` asks for fewer, legacy tuple caches accepted). `generate` comes from
`GenerationMixin` (generation/generate.py). `decode_step` is one fixed-shape token step built from
`decode_pieces`, plain functions that a runner may compile (generation/cuda_graphs.py); the model
itself knows nothing of graphs or compilation.
"""
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..generation.cuda_graphs import release_decoders
from ..generation.generate import GenerationMixin
from ..kernels import dispatch
from .attention import AttentionInputs, build_attention_inputs, make_attention, row_attention_inputs
from .devices import current, find_split, hop
from .input_checks import check_input_ids, check_inputs_embeds, check_legacy_cache
from .kv_cache import KVCache, LayerCache
from .language_config import DeepseekV2Config
from .moe import GatedMLP, MoE
from .outputs import CausalLMOutput
from .rms_norm import RMSNorm
from .rope import rope_for

DeepseekV2RMSNorm = RMSNorm  # the reference's name


class DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekV2Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = make_attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp = MoE(config)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(self, x, rope, attn: AttentionInputs, kv: Optional[LayerCache]):
        """x [B, S, h]; rope = (cos, sin) for the new tokens; kv = this layer's cache (None: attend
        over the new tokens alone)."""
        if kv is None:
            query, entries = self.self_attn.project(self.input_layernorm(x), *rope)
        else:
            query = self.pre_attention(x, *rope, kv, attn.cache_positions)
            entries = kv.read(attn.kv_len)
        return self.post_attention(x, self.self_attn.attend(query, entries, attn))

    def pre_attention(self, x, cos, sin, kv: LayerCache, positions):
        """Norm, projections and RoPE of the new tokens, their entries written into `kv` at cache slots
        `positions`; returns the queries."""
        return self.self_attn.project_into(self.input_layernorm(x), cos, sin, kv, positions)

    def post_attention(self, x, context):
        delta, norm = self.self_attn.o_proj(context), self.post_attention_layernorm
        if isinstance(self.mlp, MoE):  # the sum, its norm and the router's logits: one kernel where dispatch has it
            gate = self.mlp.gate
            x, normed, prepared = dispatch.add_norm_logits(x, delta, norm.weight, norm.eps, gate.weight, gate.routing,
                                                           self.training, self.mlp.experts.gate_up_proj,
                                                           self.mlp.num_shared)
            return x + self.mlp(normed, prepared)
        x = x + delta
        return x + self.mlp(norm(x))


class DeepseekV2Model(nn.Module):
    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        config.validate_for_model()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rope = rope_for(config)
        self.split = None  # a devices.Split when spread over several devices (set by the parent model)

    def run_layers(self, hidden, position_ids, attn: AttentionInputs, cache: Optional[KVCache], all_hidden=None):
        """The decoder stack on embeddings `hidden` [B, S, h]; returns the final-normed states."""
        if self.split is not None:
            return self._run_split(hidden, position_ids, attn, cache, all_hidden)
        rope = self.rope.lookup(position_ids, hidden.dtype, seq_len=attn.kv_len)
        for i, layer in enumerate(self.layers):
            if all_hidden is not None:
                all_hidden.append(hidden)
            hidden = layer(hidden, rope, attn, cache.layer(i) if cache is not None else None)
        hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return hidden

    def _run_split(self, hidden, position_ids, attn: AttentionInputs, cache: Optional[KVCache], all_hidden):
        """run_layers over several devices: each run of consecutive layers on one device gets the
        hidden states moved there once, its own rope rows and attention mask, and that device
        current (for the Triton kernels)."""
        for device, start, end in self.split.segments:
            hidden = hop(hidden, device)
            rope = self.rope.lookup(hop(position_ids, device), hidden.dtype, seq_len=attn.kv_len)
            local = AttentionInputs(hop(attn.cache_positions, device), attn.kv_len,
                                    None if attn.mask is None else hop(attn.mask, device))
            with current(device):
                for i in range(start, end):
                    if all_hidden is not None:
                        all_hidden.append(hidden)
                    hidden = self.layers[i](hidden, rope, local, cache.layer(i) if cache is not None else None)
        hidden = hop(hidden, self.split.norm)
        with current(self.split.norm):
            hidden = self.norm(hidden)
        if all_hidden is not None:
            all_hidden.append(hidden)
        return hidden


def _pre_attention(layer: DecoderLayer, x, cos, sin, kv: LayerCache, slot):
    """Norm, projections, RoPE and the cache write of one decode step's layer (fixed shapes)."""
    return layer.pre_attention(x, cos, sin, kv, slot)


def _between_attentions(layer: DecoderLayer, next_layer: DecoderLayer, x, context, cos, sin, next_kv: LayerCache,
                        slot):
    """What follows a layer's attention and precedes the next one's: the layer's o_proj, residual sums
    and MLP, then the next layer's `_pre_attention`. One piece rather than two, so that a compiler
    fuses the layer's last residual sum with the next layer's input norm."""
    x = layer.post_attention(x, context)
    return x, _pre_attention(next_layer, x, cos, sin, next_kv, slot)


def _last_logits(lm: "DeepseekV2ForCausalLM", layer: DecoderLayer, x, context):
    """The last layer after its attention, the final norm and the LM head: float32 logits [B, vocab]."""
    x = layer.post_attention(x, context)
    return dispatch.lm_head(lm.model.norm(x[:, -1]), lm.lm_head.weight).float()


class DecodePieces(NamedTuple):
    """The fixed-shape parts of a decode step, as plain functions of (modules, tensors); attention
    between them reads the cache up to a length that varies by step."""

    pre_attention: Callable  # the first layer's
    between_attentions: Callable
    last_logits: Callable


class DeepseekV2ForCausalLM(GenerationMixin, nn.Module):
    cuda_graphs = True  # generate on CUDA decodes with CUDA graphs (generation/cuda_graphs.py); False: plain kernels
    # decode steps (per batch size) on plain kernels before the steps are compiled: a first answer
    # needs no compilation; a process that keeps decoding pays for it once (0: compile at once)
    compile_decode_after = 2048

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.config = config
        self.model = DeepseekV2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (the first one of a split model)."""
        return self.model.embed_tokens.weight.device

    @property
    def is_split(self) -> bool:
        """Whether the decoder is spread over several devices (then generate takes the plain path)."""
        return self.model.split is not None

    def refresh_placement(self) -> None:
        """Find again which device each part is on (after loading, and after every `.to()`)."""
        self.model.split = find_split(self)

    def cache_devices(self, default: torch.device):
        """The device(s) for a new KV cache: each layer's own on a split model, else `default`."""
        return self.model.split.layers if self.model.split is not None else default

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cpu() / .half() ... (also when called on the VL model): the fast path's static
        # caches and graphs belong to the old tensors; free them now rather than at the next generate
        release_decoders(self)
        result = super()._apply(fn, *args, **kwargs)
        self.refresh_placement()
        return result

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep: int = 0,
        **unused,
    ):
        """Reference-compatible forward. `past_key_values` may be a KVCache (appended to in place)
        or the reference's legacy tuples (copied). `logits_to_keep=n` computes logits for the last
        n positions only (0: all, as the reference)."""
        if output_attentions:
            raise NotImplementedError("output_attentions is not supported: attention runs in fused kernels")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            check_input_ids(input_ids, self.model.embed_tokens.num_embeddings)
            inputs_embeds = self.model.embed_tokens(input_ids)
        check_inputs_embeds(inputs_embeds, self.config.hidden_size)
        B, S, _ = inputs_embeds.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        cache = self.prepare_cache(past_key_values, B, S, inputs_embeds) if (use_cache or past_key_values is not None) else None
        past = cache.length if cache is not None else 0
        check_context_length(past + S, self.config.max_position_embeddings)
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + S):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(B, past + S)} "
                f"(batch, cached + new tokens)"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + S, device=inputs_embeds.device).unsqueeze(0).expand(B, S)
        elif not isinstance(position_ids, torch.Tensor) or tuple(position_ids.shape) not in ((B, S), (1, S), (S,)):
            raise ValueError(f"position_ids has shape {tuple(getattr(position_ids, 'shape', ()))}; expected {(B, S)}")
        if labels is not None and (not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (B, S)):
            raise ValueError(f"labels has shape {tuple(getattr(labels, 'shape', ()))}; expected {(B, S)} (one label "
                             "per input position)")
        attn = build_attention_inputs(attention_mask, past, S, past + S, inputs_embeds.dtype, inputs_embeds.device)
        all_hidden = [] if output_hidden_states else None
        hidden = self.model.run_layers(inputs_embeds, position_ids, attn, cache, all_hidden)
        if cache is not None:
            cache.length = past + S
        hidden = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        if self.model.split is not None:  # the head may sit elsewhere; logits come back to the input's device
            logits = hop(self.lm_head(hop(hidden, self.model.split.head)).float(), inputs_embeds.device)
        else:
            logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        out = CausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )
        return out if return_dict is not False else out.to_tuple()

    decode_pieces = DecodePieces(_pre_attention, _between_attentions, _last_logits)

    def decode_step(self, tokens, positions, slot, visible, kv_len: int, cache: KVCache,
                    pieces: Optional[DecodePieces] = None) -> torch.Tensor:
        """Logits [B, vocab] (float32) of one token per row: `tokens` [B] at rope `positions` [B], written
        to cache slot `slot` ([1], a device tensor, the same for every row; or [B, 1], each row its own
        slot, as the continuous-batching engine's rows of different lengths), attending to the first
        `kv_len` slots up to its slot where `visible` [B, >= kv_len] is set. All shapes are fixed for a
        given kv_len and nothing is read back to the host, so a runner can capture this in a CUDA
        graph; `pieces` (default `decode_pieces`) are what it may hand in compiled."""
        pre_attention, between_attentions, last_logits = pieces or self.decode_pieces
        model = self.model
        x = model.embed_tokens(tokens[:, None])
        cos, sin = model.rope.lookup(positions[:, None], x.dtype)
        if slot.dim() == 2:
            attn = row_attention_inputs(visible, slot, kv_len, x.dtype)
        else:
            attn = build_attention_inputs(visible, 0, 1, kv_len, x.dtype, x.device, cache_positions=slot)
        layers = model.layers
        query = pre_attention(layers[0], x, cos, sin, cache.layer(0), slot)
        for i, layer in enumerate(layers[:-1]):
            context = layer.self_attn.attend(query, cache.layer(i).read(kv_len), attn)
            x, query = between_attentions(layer, layers[i + 1], x, context, cos, sin, cache.layer(i + 1), slot)
        context = layers[-1].self_attn.attend(query, cache.layer(len(layers) - 1).read(kv_len), attn)
        return last_logits(self, layers[-1], x, context)

    def prepare_cache(self, past_key_values, batch_size: int, new_tokens: int, like: torch.Tensor) -> KVCache:
        """A KVCache with room for `new_tokens` more: the given one, one built from legacy tuples,
        or a fresh one."""
        if past_key_values is None:
            return KVCache(self.config, batch_size, new_tokens, self.cache_devices(like.device), like.dtype)
        if isinstance(past_key_values, KVCache):
            cache = past_key_values
        else:
            check_legacy_cache(past_key_values, self.config)
            cache = KVCache.from_legacy(past_key_values, self.config, extra_capacity=new_tokens)
        if cache.batch_size != batch_size:
            raise ValueError(f"past_key_values holds {cache.batch_size} rows but the input has {batch_size}")
        cache.reserve(cache.length + new_tokens)
        return cache

    @staticmethod
    def _reorder_cache(past_key_values, beam_idx):
        if isinstance(past_key_values, KVCache):
            return past_key_values.reorder(beam_idx)
        return tuple(tuple(t.index_select(0, beam_idx.to(t.device)) for t in layer) for layer in past_key_values)


def check_context_length(total: int, limit: int) -> None:
    if total > limit:
        raise ValueError(
            f"the sequence needs {total} positions but the model's context is max_position_embeddings="
            f"{limit}; shorten the prompt (fewer or smaller images: each tiled image costs up to 2101 "
            f"tokens) or ask for fewer new tokens"
        )
