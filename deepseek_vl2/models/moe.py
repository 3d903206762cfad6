"""Feed-forward blocks of the decoder: the gated MLP (dense layer 0, shared experts) and the
DeepSeekMoE block with its router (spec language_model.md §7).

Experts (the shared ones included, as extra experts) are stored stacked per layer ([E, 2*I, h]
gate+up and [E, h, I] down) and run as a grouped GEMM over the tokens sorted by expert, or as a
gemv kernel over the chosen experts for decode-sized inputs on CUDA; no host synchronisation
either way. The checkpoint keeps the official names; `checkpoint_keys` maps them onto the stacks.
"""
import torch
import torch.nn.functional as F
from torch import nn

from . import triton_decode, triton_moe
from .configuration_deepseek import DeepseekV2Config


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up held as one [2*I, h] projection."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def checkpoint_keys(self):
        I = self.intermediate_size
        return {
            "gate_proj.weight": ("gate_up_proj.weight", (slice(0, I),)),
            "up_proj.weight": ("gate_up_proj.weight", (slice(I, 2 * I),)),
        }

    def forward(self, x):
        return self.down_proj(_silu_mul(self.gate_up_proj(x)))


class Router(nn.Module):
    """Picks `top_k` experts per token and their weights (float32 throughout, unsorted top-k)."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.method = config.topk_method
        self.scoring = config.scoring_func
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.normalize = config.norm_topk_prob
        self.scale = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        if self.method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.empty(self.num_experts))

    def forward(self, x, always_on: int = 0):
        """x [N, h] -> expert ids [N, k + always_on] (int64) and weights (float32): the top k, then
        the `always_on` experts numbered from num_experts on (the shared ones) with weight 1."""
        if self._fused_kernel_applies(x):
            bias = getattr(self, "e_score_correction_bias", None)
            return triton_decode.route(x, self.weight, bias, self.top_k, self.scoring == "sigmoid",
                                       self.top_k > 1 and self.normalize, float(self.scale), always_on)
        ids, weights = self._choose(x)
        if always_on:
            N = x.shape[0]
            extra = torch.arange(self.num_experts, self.num_experts + always_on, device=x.device)
            ids = torch.cat((ids, extra.expand(N, -1)), dim=1)
            weights = torch.cat((weights, weights.new_ones(N, always_on)), dim=1)
        return ids, weights

    def _choose(self, x):
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        if self.method == "greedy":
            weights, ids = torch.topk(scores, self.top_k, dim=-1, sorted=False)
        elif self.method == "group_limited_greedy":
            group_scores = scores.view(len(x), self.n_group, -1).amax(dim=-1)
            masked = self._keep_top_groups(scores, group_scores)
            weights, ids = torch.topk(masked, self.top_k, dim=-1, sorted=False)
        else:  # noaux_tc: select with the bias, weigh without it
            if self.training:
                raise RuntimeError("topk_method 'noaux_tc' is inference-only (as in the reference)")
            choice = scores + self.e_score_correction_bias.float()
            group_scores = choice.view(len(x), self.n_group, -1).topk(2, dim=-1).values.sum(dim=-1)
            masked = self._keep_top_groups(choice, group_scores)
            ids = torch.topk(masked, self.top_k, dim=-1, sorted=False).indices
            weights = scores.gather(1, ids)
        if self.top_k > 1 and self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.scale

    def _fused_kernel_applies(self, x) -> bool:
        """The fused router (float32 logits, then one kernel for the top-k and weights) covers CUDA
        inference without group limits."""
        one_group = self.method == "greedy" or self.n_group == 1
        return one_group and not self.training and triton_decode.half_on_cuda(x)

    def _keep_top_groups(self, scores, group_scores):
        """Zero (not -inf, as the reference) the scores of experts outside the best groups."""
        best = torch.topk(group_scores, self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        keep = keep.repeat_interleave(self.num_experts // self.n_group, dim=1)
        return scores.masked_fill(~keep, 0.0)


class RoutedExperts(nn.Module):
    """Expert MLPs of one width stored stacked ([E, 2*I, h] gate+up, [E, h, I] down) and run on
    (token, expert) pairs: a sort by expert and grouped GEMMs, or for decode-sized inputs on CUDA
    the gemv kernel, which reads each chosen expert directly (no sorting)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x, ids, weights):
        """x [N, h], ids/weights [N, k] -> sum_k weights * expert_ids(x), [N, h] in x's dtype.

        Expert outputs are combined in float32, as the reference does."""
        k = ids.shape[1]
        flat_ids = ids.flatten()
        if triton_decode.decode_sized(x, triton_decode.MAX_GEMV_TOKENS):
            act = triton_decode.gemv(x, self.gate_up_proj, flat_ids, k, True)
            return _combine(triton_decode.gemv(act, self.down_proj, flat_ids, 1, False), weights)
        # stable sort by expert; one-byte keys make the GPU radix sort a single pass
        keys = flat_ids.to(torch.uint8) if self.num_experts <= 256 else flat_ids
        order = keys.argsort(stable=True)
        rows = x[order // k]
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
        ends = counts.cumsum(0, dtype=torch.int32)
        if grouped_mm_supported(x):
            act = _silu_mul(torch._grouped_mm(rows, self.gate_up_proj.transpose(1, 2), offs=ends))
            out_sorted = torch._grouped_mm(act, self.down_proj.transpose(1, 2), offs=ends)
        else:
            out_sorted = self._per_expert(rows, ends)
        if triton_moe.applies(out_sorted):  # gather-combine in one kernel
            slots = torch.empty_like(order)
            slots[order] = torch.arange(len(order), device=order.device)
            return triton_moe.combine_sorted(out_sorted, slots, weights)
        out = torch.empty_like(out_sorted)
        out[order] = out_sorted
        return _combine(out, weights)

    def _per_expert(self, rows, ends):
        """Fallback for a torch without grouped GEMM on this device: one expert at a time (this
        reads the group boundaries on the host)."""
        out = torch.empty_like(rows)
        start = 0
        for e, end in enumerate(ends.tolist()):
            if end > start:
                act = _silu_mul(F.linear(rows[start:end], self.gate_up_proj[e]))
                out[start:end] = F.linear(act, self.down_proj[e])
            start = end
        return out


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] gate and up halves -> silu(gate) * up [..., I] (one kernel on CUDA)."""
    if triton_moe.applies(gate_up):
        return triton_moe.silu_mul(gate_up.reshape(-1, gate_up.shape[-1])).view(*gate_up.shape[:-1], -1)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _combine(outputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Expert outputs [N*k, h] in (token, slot) order -> per token sum of weight * output, in float32
    (as the reference), returned in the outputs' dtype."""
    N, k = weights.shape
    return (outputs.view(N, k, -1).float() * weights.unsqueeze(-1)).sum(dim=1).to(outputs.dtype)


_GROUPED_MM_SUPPORT = {}


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs for x's device and dtype (probed once per pair)."""
    key = (x.device.type, x.device.index, x.dtype)
    if key not in _GROUPED_MM_SUPPORT:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:
                a = torch.ones(16, 16, device=x.device, dtype=x.dtype)
                b = torch.ones(2, 16, 16, device=x.device, dtype=x.dtype)
                offs = torch.tensor([8, 16], device=x.device, dtype=torch.int32)
                ok = bool(torch._grouped_mm(a, b.transpose(1, 2), offs=offs)[0, 0] == 16)
            except (RuntimeError, NotImplementedError):
                ok = False
        _GROUPED_MM_SUPPORT[key] = ok
    return _GROUPED_MM_SUPPORT[key]


class MoE(nn.Module):
    """Routed experts plus the always-on shared experts.

    The reference's shared experts are one MLP n_shared_experts times as wide as an expert. Its
    intermediate units split into n_shared_experts expert-sized blocks whose outputs add up, so
    they are stored as that many extra experts after the routed ones, and every token takes them
    with weight 1. One expert computation then serves both (one kernel pair at decode)."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.num_routed = config.n_routed_experts
        self.num_shared = config.n_shared_experts or 0
        self.gate = Router(config)
        self.experts = RoutedExperts(self.num_routed + self.num_shared, config.hidden_size,
                                     config.moe_intermediate_size)

    def checkpoint_keys(self):
        """Official names: experts.{e}.{gate,up,down}_proj.weight and shared_experts.{...}.weight."""
        I, E, S, keys = self.experts.intermediate_size, self.num_routed, self.num_shared, {}
        for e in range(E):
            keys[f"experts.{e}.gate_proj.weight"] = ("experts.gate_up_proj", (e, slice(0, I)))
            keys[f"experts.{e}.up_proj.weight"] = ("experts.gate_up_proj", (e, slice(I, 2 * I)))
            keys[f"experts.{e}.down_proj.weight"] = ("experts.down_proj", (e,))
        if S:
            h = self.experts.down_proj.shape[1]
            shared = slice(E, E + S)
            # [S, I, h] blocks <-> the [S*I, h] gate/up; [S, h, I] blocks <-> the [h, S*I] down
            keys["shared_experts.gate_proj.weight"] = ("experts.gate_up_proj", (shared, slice(0, I)), (0, 1, 2),
                                                       (S * I, h))
            keys["shared_experts.up_proj.weight"] = ("experts.gate_up_proj", (shared, slice(I, 2 * I)), (0, 1, 2),
                                                     (S * I, h))
            keys["shared_experts.down_proj.weight"] = ("experts.down_proj", (shared,), (1, 0, 2), (h, S * I))
        return keys

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        ids, weights = self.gate(flat, always_on=self.num_shared)
        return self.experts(flat, ids, weights).view(shape)
