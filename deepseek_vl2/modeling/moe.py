"""Feed-forward blocks of the decoder: the gated MLP (dense layer 0, shared experts) and the
DeepSeekMoE block with its router.

Experts (the shared ones included, as extra experts:
docs/deviations.md#shared-experts-run-as-extra-routed-experts) are stored stacked per layer ([E, 2*I, h]
gate+up and [E, h, I] down) and run by `dispatch.moe` (a grouped GEMM over the tokens sorted by
expert; for decode-sized inputs on CUDA a gemv over the chosen experts, or a kernel in which each
expert finds its own tokens; no host synchronisation in any case). The checkpoint keeps the
official names; `checkpoint_keys` maps them onto the stacks.
"""
import torch
from torch import nn

from ..kernels import dispatch
from ..kernels.reference import Routing
from ..weights.layout import OfficialSlice, stacked_rows
from .language_config import DeepseekV2Config


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up held as one [2*I, h] projection."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def checkpoint_keys(self):
        return stacked_rows("gate_up_proj", [("gate_proj", self.intermediate_size), ("up_proj", self.intermediate_size)])

    def forward(self, x):
        return self.down_proj(dispatch.silu_mul(self.gate_up_proj(x)))


class Router(nn.Module):
    """The router's weight (and correction bias) and how it picks `top_k` experts per token (float32
    throughout, unsorted top-k); dispatch.moe routes with them."""

    def __init__(self, config: DeepseekV2Config):
        super().__init__()
        self.routing = Routing(top_k=config.num_experts_per_tok, num_experts=config.n_routed_experts,
                               method=config.topk_method, scoring=config.scoring_func, n_group=config.n_group,
                               topk_group=config.topk_group, normalize=config.norm_topk_prob,
                               scale=config.routed_scaling_factor)
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        if config.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.empty(config.n_routed_experts))

    @property
    def correction_bias(self):
        return getattr(self, "e_score_correction_bias", None)


class RoutedExperts(nn.Module):
    """Expert MLPs of one width stored stacked ([E, 2*I, h] gate+up, [E, h, I] down), run on (token,
    expert) pairs by dispatch.moe (expert outputs combined in float32, as the reference does)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))


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
            keys[f"experts.{e}.gate_proj.weight"] = OfficialSlice("experts.gate_up_proj", (e, slice(0, I)))
            keys[f"experts.{e}.up_proj.weight"] = OfficialSlice("experts.gate_up_proj", (e, slice(I, 2 * I)))
            keys[f"experts.{e}.down_proj.weight"] = OfficialSlice("experts.down_proj", (e,))
        if S:
            h = self.experts.down_proj.shape[1]
            shared = slice(E, E + S)
            # [S, I, h] blocks <-> the [S*I, h] gate/up; [S, h, I] blocks <-> the [h, S*I] down
            keys["shared_experts.gate_proj.weight"] = OfficialSlice(
                "experts.gate_up_proj", (shared, slice(0, I)), permute=(0, 1, 2), shape=(S * I, h))
            keys["shared_experts.up_proj.weight"] = OfficialSlice(
                "experts.gate_up_proj", (shared, slice(I, 2 * I)), permute=(0, 1, 2), shape=(S * I, h))
            keys["shared_experts.down_proj.weight"] = OfficialSlice(
                "experts.down_proj", (shared,), permute=(1, 0, 2), shape=(h, S * I))
        return keys

    def forward(self, x, prepared=None):
        """x [..., h] -> the sum over each token's experts of weight * expert(x), in x's dtype;
        `prepared`: what dispatch.add_norm_logits made for the experts besides x (the router's logits)."""
        if self.training and self.gate.routing.method == "noaux_tc":
            raise RuntimeError("topk_method 'noaux_tc' is inference-only (as in the reference)")
        shape = x.shape
        out = dispatch.moe(x.reshape(-1, shape[-1]), self.gate.weight, self.gate.correction_bias, self.gate.routing,
                           self.num_shared, self.experts.gate_up_proj, self.experts.down_proj, self.training,
                           prepared)
        return out.view(shape)
