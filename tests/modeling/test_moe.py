"""The MoE block on its own: the router against hand-computed choices and weights, the stacked
experts against a per-token loop over plain MLPs, and the shared experts (stored as extra experts)
against the reference's one wide MLP."""
import math

import torch
import torch.nn.functional as F

from deepseek_vl2.kernels import dispatch
from deepseek_vl2.kernels.reference import Routing, route
from deepseek_vl2.modeling.moe import MoE
from deepseek_vl2.weights.layout import checkpoint_layout, to_official
from deepseek_vl2.weights.random_init import init_random_weights


def routing(**kw):
    base = dict(top_k=2, num_experts=4, method="greedy", scoring="softmax", n_group=1, topk_group=1, normalize=False,
                scale=1.0)
    return Routing(**dict(base, **kw))


def test_greedy_softmax_router_by_hand():
    weight = torch.eye(4)  # logits = x
    x = torch.tensor([[math.log(1.0), math.log(2.0), math.log(3.0), math.log(4.0)]])  # softmax 0.1 .. 0.4
    ids, w = route(x, weight, None, routing(), always_on=1)
    order = ids[0, :2].argsort()
    assert ids[0, :2][order].tolist() == [2, 3] and ids[0, 2].item() == 4  # the shared expert, numbered after
    assert torch.allclose(w[0, :2][order], torch.tensor([0.3, 0.4])) and w[0, 2].item() == 1.0
    ids, w = route(x, weight, None, routing(normalize=True, scale=2.0))
    assert torch.allclose(w[0].sort().values, torch.tensor([2 * 3 / 7, 2 * 4 / 7]))


def test_group_limited_and_noaux_routers_by_hand():
    weight = torch.eye(4)
    x = torch.tensor([[0.0, 3.0, 2.0, 2.5]])  # groups (0, 1) and (2, 3)
    group = routing(method="group_limited_greedy", scoring="sigmoid", n_group=2, topk_group=1)
    ids, w = route(x, weight, None, group)
    assert sorted(ids[0].tolist()) == [0, 1]  # the best group holds expert 1 (sigmoid 3.0)
    assert torch.allclose(w[0].sort().values, torch.sigmoid(torch.tensor([0.0, 3.0])))
    noaux = routing(method="noaux_tc", scoring="sigmoid", n_group=2, topk_group=1)
    bias = torch.tensor([0.0, 0.0, 5.0, 5.0])  # chooses group (2, 3); weights without the bias
    ids, w = route(x, weight, bias, noaux)
    assert sorted(ids[0].tolist()) == [2, 3]
    assert torch.allclose(w[0].sort().values, torch.sigmoid(torch.tensor([2.0, 2.5])))


def test_stacked_experts_equal_a_loop_over_plain_mlps():
    g = torch.Generator().manual_seed(0)
    E, h, inter, N, k = 3, 8, 12, 7, 2  # widths: multiples of 16 bytes, as torch._grouped_mm needs
    gate_up = torch.randn(E, 2 * inter, h, generator=g)
    down = torch.randn(E, h, inter, generator=g)
    x = torch.randn(N, h, generator=g)
    ids = torch.randint(0, E, (N, k), generator=g)
    weights = torch.rand(N, k, generator=g)
    got = dispatch.experts(x, gate_up, down, ids, weights)
    for n in range(N):
        want = sum(weights[n, j] * F.linear(F.silu(F.linear(x[n], gate_up[e, :inter])) * F.linear(x[n], gate_up[e, inter:]),
                                             down[e]) for j, e in enumerate(ids[n].tolist()))
        assert torch.allclose(got[n], want, atol=1e-5)


@torch.no_grad()
def test_shared_experts_equal_the_reference_wide_mlp(make_config):
    config = make_config(n_shared_experts=2)
    moe = init_random_weights(MoE(config), std=0.3, seed=4).eval()
    x = torch.randn(3, config.hidden_size, generator=torch.Generator().manual_seed(5))
    params = dict(moe.named_parameters())
    official = {name: to_official(params, where) for name, where in checkpoint_layout(moe).items()}
    wide = F.linear(F.silu(F.linear(x, official["shared_experts.gate_proj.weight"]))
                    * F.linear(x, official["shared_experts.up_proj.weight"]), official["shared_experts.down_proj.weight"])
    ids, weights = dispatch.route(x, moe.gate.weight, None, moe.gate.routing, 0, False)  # the routed experts only
    routed = dispatch.experts(x, moe.experts.gate_up_proj, moe.experts.down_proj, ids, weights)
    assert official["shared_experts.gate_proj.weight"].shape == (2 * config.moe_intermediate_size, config.hidden_size)
    assert torch.allclose(moe(x), routed + wide, atol=1e-5)
