"""dispatch.py on the CPU (and with grad mode on): every op takes the PyTorch reference path."""
import pytest
import torch

from deepseek_vl2.kernels import dispatch, reference
from deepseek_vl2.quantization.config import QuantizationConfig
from deepseek_vl2.quantization.weight import QuantizedWeight


def test_cpu_ops_are_the_reference_ops():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 16, generator=g), torch.randn(16, generator=g)
    assert torch.equal(dispatch.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))
    q, cos, sin = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    assert torch.equal(dispatch.rotary(q, cos, sin, True), reference.rotary(q, cos, sin, True))
    gate_up = torch.randn(4, 12, generator=g)
    assert torch.equal(dispatch.silu_mul(gate_up), reference.silu_mul(gate_up))
    head = torch.randn(10, 16, generator=g)
    assert torch.equal(dispatch.lm_head(x[:1], head), torch.nn.functional.linear(x[:1], head))
    quantized_head = QuantizedWeight((10, 16), QuantizationConfig("int8"), torch.float32)
    quantized_head.write((), head)
    expected = torch.nn.functional.linear(x[:1], quantized_head.dequantize())
    assert torch.equal(dispatch.lm_head(x[:1], quantized_head), expected)
    assert (expected - torch.nn.functional.linear(x[:1], head)).abs().max() < 0.05  # int8 rounding
    kv = torch.randn(1, 2, 2, 3, 8, generator=g)
    assert torch.equal(dispatch.mha_attention(q.expand(1, 2, 3, 8), kv, None), reference.mha_attention(q, kv, None))


def test_rotary_formula_rotates_interleaved_pairs():
    x = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]])
    assert reference.deinterleave(x).tolist() == [[[[1.0, 3.0, 2.0, 4.0]]]]
    cos, sin = torch.zeros(1, 1, 4), torch.ones(1, 1, 4)  # a quarter turn: (a, b) -> (-b, a)
    assert reference.rotary(x, cos, sin).tolist() == [[[[-3.0, -4.0, 1.0, 2.0]]]]


@pytest.mark.parametrize("setting, tables", [
    (dispatch.quant_gemv_rows, (dispatch.QUANT_EXPERT_GEMV_ROWS, dispatch.QUANT_LINEAR_GEMV_ROWS)),
    (dispatch.quant_expert_rows, (dispatch.QUANT_EXPERT_GEMV_ROWS, dispatch.QUANT_EXPERT_SCAN_ROWS))])
def test_two_limit_settings_set_both_widths_and_put_the_limits_back(setting, tables):
    saved = [dict(table) for table in tables]
    assert all(None not in table.values() for table in saved)  # both widths from a measured row count
    with pytest.raises(RuntimeError, match="inside"):
        with setting(3, 5):
            assert [dict(table) for table in tables] == [{4: 3, 8: 3}, {4: 5, 8: 5}]
            raise RuntimeError("inside")
    assert [dict(table) for table in tables] == saved


@pytest.mark.parametrize("setting, table", [(dispatch.stack_dequantize_rows, dispatch.QUANT_STACK_DEQUANTIZE_ROWS),
                                            (dispatch.quant_linear_tile_rows, dispatch.QUANT_LINEAR_TILE_ROWS)])
def test_row_limit_settings_set_both_widths_and_put_the_limits_back(setting, table):
    saved = dict(table)
    assert saved[4] is not None and saved[8] is not None  # both widths from a measured row count
    with pytest.raises(RuntimeError, match="inside"):
        with setting(7):
            assert table == {4: 7, 8: 7}
            raise RuntimeError("inside")
    assert table == saved


def test_sdpa_backends_leave_the_cpu_to_pytorch():
    before = torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()
    with dispatch.sdpa_backends(torch.zeros(1)):
        assert (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sdpa_avoids_cudnn_and_matches_the_default_choice():
    """cuDNN's attention plans every new shape (tens of ms); the plan-free backends give the same
    attention within bf16 noise, with and without a mask."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 77, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    mask = torch.ones(77, 77, device="cuda", dtype=torch.bool).tril()
    for kw in (dict(is_causal=True), dict(attn_mask=mask), {}):
        expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)
        with dispatch.sdpa_backends(q):
            choice = torch._fused_sdp_choice(q, k, v, kw.get("attn_mask"), 0.0, kw.get("is_causal", False))
            got = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)
        assert choice != torch.nn.attention.SDPBackend.CUDNN_ATTENTION.value
        assert (got.float() - expected).abs().max().item() < 2e-2




def quantized(shape, scheme, device="cpu", dtype=torch.float32, seed=1):
    """A QuantizedWeight of random normal(0, 0.1) weights of `shape` (int4 in groups of 32)."""
    from deepseek_vl2.quantization.config import QuantizationConfig
    from deepseek_vl2.quantization.weight import QuantizedWeight

    weight = QuantizedWeight(shape, QuantizationConfig(scheme, 32), dtype, device)
    weight.write((), torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1)
    return weight


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_cpu_quantized_ops_are_the_reference_ops_on_dequantized_weights(scheme):
    g = torch.Generator().manual_seed(2)
    gate_up, down, proj = quantized((6, 64, 64), scheme), quantized((6, 64, 32), scheme, seed=3), \
        quantized((48, 64), scheme, seed=4)
    x = torch.randn(5, 64, generator=g)
    ids = torch.randint(0, 6, (5, 2), generator=g)
    weights = torch.rand(5, 2, generator=g)
    want = dispatch.experts(x, gate_up.dequantize(), down.dequantize(), ids, weights)
    assert torch.equal(dispatch.experts(x, gate_up, down, ids, weights), want)
    bias = torch.randn(48, generator=g)
    assert torch.equal(dispatch.quantized_linear(x[None, :2], proj, bias),
                       torch.nn.functional.linear(x[None, :2], proj.dequantize(), bias))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_cuda_quantized_decode_ops_capture_in_a_graph(scheme):
    """On CUDA in bf16: up to QUANT_EXPERT_GEMV_ROWS / QUANT_LINEAR_GEMV_ROWS rows through the quant gemv
    kernels, more through the experts' scanning GEMM up to QUANT_EXPERT_SCAN_ROWS, then the grouped
    GEMM / the dense tiles up to QUANT_LINEAR_TILE_ROWS / the dequantized weights, all matching the
    reference on the dequantized weights; the decode-sized calls (gemv, scanning GEMM and tiles)
    capture in a CUDA graph and replay on new inputs as they run eagerly."""
    g = torch.Generator().manual_seed(5)
    gate_up = quantized((10, 2 * 128, 256), scheme, "cuda", torch.bfloat16)
    down = quantized((10, 256, 128), scheme, "cuda", torch.bfloat16, seed=6)
    proj = quantized((384, 256), scheme, "cuda", torch.bfloat16, seed=7)
    limits = (dispatch.QUANT_EXPERT_GEMV_ROWS[gate_up.bits], dispatch.QUANT_LINEAR_GEMV_ROWS[proj.bits],
              dispatch.QUANT_LINEAR_TILE_ROWS[proj.bits], dispatch.QUANT_EXPERT_SCAN_ROWS[gate_up.bits])
    for rows in sorted({1, *limits, *(limit + 1 for limit in limits)}):
        x = torch.randn(rows, 256, generator=g).to("cuda", torch.bfloat16)
        ids = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(rows)]).cuda()
        weights = torch.rand(rows, 4, generator=g).cuda()
        with torch.inference_mode():
            got = dispatch.experts(x, gate_up, down, ids, weights)
            want = dispatch.experts(x, gate_up.dequantize(), down.dequantize(), ids, weights)
            assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()
            got = dispatch.quantized_linear(x, proj, None)
            want = torch.nn.functional.linear(x, proj.dequantize())
            assert (got.float() - want.float()).abs().max() <= 2e-2 * want.float().abs().max()
    for rows in (2, limits[1] + 1, limits[0] + 1):  # the gemv; the dense tiles for the linear layer; the scan
        x = torch.randn(rows, 256, generator=g).to("cuda", torch.bfloat16)
        ids = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(rows)]).cuda()
        weights = torch.rand(rows, 4, generator=g).cuda()

        def step(x=x, ids=ids, weights=weights):
            return dispatch.quantized_linear(dispatch.experts(x, gate_up, down, ids, weights), proj, None)

        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()  # compile the kernels outside the capture
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
            x.copy_(torch.randn(rows, 256, generator=g).to("cuda", torch.bfloat16))
            ids.copy_(torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(rows)]).cuda())
            graph.replay()
            assert torch.equal(out, step())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_int4_groups_of_16_columns_give_the_reference_products():
    """int4 weights in groups of 16 columns (which the tile kernels got wrong with 2 warps under
    Triton 3.6) match the reference on the dequantized weights at decode and prefill row counts."""
    g = torch.Generator().manual_seed(9)
    gate_up = quantized((10, 2 * 48, 64), "int4", "cuda", torch.bfloat16)
    down = quantized((10, 64, 48), "int4", "cuda", torch.bfloat16, seed=6)
    proj = quantized((96, 48), "int4", "cuda", torch.bfloat16, seed=7)
    assert (gate_up.group, down.group, proj.group) == (32, 16, 16)
    for rows in (1, 3, 8, 12, 40, 300):
        x = torch.randn(rows, 64, generator=g).to("cuda", torch.bfloat16)
        ids = torch.stack([torch.randperm(10, generator=g)[:4] for _ in range(rows)]).cuda()
        weights = torch.rand(rows, 4, generator=g).cuda()
        with torch.inference_mode():
            got = dispatch.experts(x, gate_up, down, ids, weights).float()
            want = dispatch.experts(x, gate_up.dequantize(), down.dequantize(), ids, weights).float()
            assert (got - want).abs().max() <= 2e-2 * want.abs().max(), f"experts, {rows} rows"
            got = dispatch.quantized_linear(x[:, :48], proj, None).float()
            want = torch.nn.functional.linear(x[:, :48], proj.dequantize()).float()
            assert (got - want).abs().max() <= 2e-2 * want.abs().max(), f"linear, {rows} rows"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_cuda_prefill_dequantizes_stacks_whole_from_the_row_limit_and_never_in_a_graph(monkeypatch, scheme):
    """From QUANT_STACK_DEQUANTIZE_ROWS token rows an expert, an eager prefill's quantized experts run
    on each stack dequantized whole (no tile-dequantizing grouped GEMM), below it and while a CUDA
    graph is captured through the grouped GEMM; both match the reference on the dequantized weights."""
    from deepseek_vl2.kernels import quant_grouped_gemm

    calls = []
    tiled = quant_grouped_gemm.grouped_gemm
    monkeypatch.setattr(quant_grouped_gemm, "grouped_gemm", lambda *a: calls.append(1) or tiled(*a))
    g = torch.Generator().manual_seed(9)
    E, k = 10, 4
    gate_up = quantized((E, 2 * 128, 256), scheme, "cuda", torch.bfloat16)
    down = quantized((E, 256, 128), scheme, "cuda", torch.bfloat16, seed=6)
    x = torch.randn(40, 256, generator=g).to("cuda", torch.bfloat16)  # 160 pairs: 16 rows an expert
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(40)]).cuda()
    weights = torch.rand(40, k, generator=g).cuda()
    with torch.inference_mode():
        want = dispatch.experts(x, gate_up.dequantize(), down.dequantize(), ids, weights).float()
        results = {}
        for limit, tile_calls in ((17, 2), (16, 0)):
            calls.clear()
            with dispatch.stack_dequantize_rows(limit):
                results[limit] = dispatch.experts(x, gate_up, down, ids, weights)
            assert len(calls) == tile_calls, f"limit {limit}"
            assert (results[limit].float() - want).abs().max() <= 2e-2 * want.abs().max(), f"limit {limit}"
        with dispatch.stack_dequantize_rows(16):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                dispatch.experts(x, gate_up, down, ids, weights)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            calls.clear()
            with torch.cuda.graph(graph):
                out = dispatch.experts(x, gate_up, down, ids, weights)
            assert len(calls) == 2  # the tiles: a graph would keep the whole stacks' scratch
        graph.replay()
        assert torch.equal(out, results[17])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_experts_match_float32_on_every_path_and_replay_in_a_graph():
    """bf16 experts at row counts on each side of the gemv and moe_decode limits (gemv pair,
    expert_gemm pair, sorted grouped GEMMs) against the float32 reference ops; the expert_gemm path
    captured in a CUDA graph replays new rows and routes as it runs eagerly."""
    g = torch.Generator().manual_seed(8)
    E, I, h, k = 12, 128, 256, 4
    gate_up = (torch.randn(E, 2 * I, h, generator=g) * 0.05).to("cuda", torch.bfloat16)
    down = (torch.randn(E, h, I, generator=g) * 0.05).to("cuda", torch.bfloat16)

    def inputs(rows):
        x = torch.randn(rows, h, generator=g).to("cuda", torch.bfloat16)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(rows)]).cuda()
        return x, ids, torch.rand(rows, k, generator=g).cuda()

    limits = dispatch.MAX_GEMV_TOKENS, dispatch.MOE_DECODE_ROWS
    with torch.inference_mode():
        for rows in (1, limits[0], limits[0] + 1, 16, limits[1], limits[1] + 1):
            x, ids, weights = inputs(rows)
            got = dispatch.experts(x, gate_up, down, ids, weights).float()
            act = reference.silu_mul(torch.einsum("rh,rkih->rki", x.float(), gate_up[ids].float()))
            want = torch.einsum("rki,rkhi,rk->rh", act, down[ids].float(), weights)
            assert (got - want).abs().max() <= 2e-2 * want.abs().max(), f"{rows} rows"
        x, ids, weights = inputs(24)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dispatch.experts(x, gate_up, down, ids, weights)  # compile the kernels outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = dispatch.experts(x, gate_up, down, ids, weights)
        for new, old in zip(inputs(24), (x, ids, weights)):
            old.copy_(new)
        graph.replay()
        assert torch.equal(out, dispatch.experts(x, gate_up, down, ids, weights))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_decode_combines_expert_pairs_inside_the_norm_kernel_after_them():
    """Inside torch.compile the decode paths' combine of a token's 8 expert outputs is the formula,
    which inductor fuses with the residual sum and the next norm into one kernel (no combine_pairs
    launch); the results equal the eager kernels' within bf16 rounding."""
    from torch._inductor.utils import run_and_get_code

    g = torch.Generator().manual_seed(3)
    rows, k, h = 2, 8, 2048
    outputs = torch.randn(rows * k, h, generator=g).to("cuda", torch.bfloat16)
    weights = torch.rand(rows, k, generator=g).cuda()
    residual = torch.randn(rows, h, generator=g).to("cuda", torch.bfloat16)
    norm_weight = torch.rand(h, generator=g).to("cuda", torch.bfloat16)

    def layer_end(outputs, weights, residual):
        x = residual + dispatch._combine_pairs(outputs, weights)
        return x, dispatch.rms_norm(x, norm_weight, 1e-6)

    with torch.inference_mode():
        eager = layer_end(outputs, weights, residual)
        torch._dynamo.reset()
        compiled, codes = run_and_get_code(torch.compile(layer_end, fullgraph=True, dynamic=False), outputs,
                                           weights, residual)
        torch._dynamo.reset()
    code = "\n".join(codes)
    assert "deepseek_vl2.combine_pairs" not in code and code.count("@triton.jit") == 1, code
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=2e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_mla_new_tokens_is_one_kernel_writing_the_cache_in_place():
    """Inside torch.compile MLA's new-token work (the query's RoPE, the latent's norm, the key's RoPE
    and the cache write; at one row the query's absorption through W_UK too) stays the one
    mla_new_tokens kernel: no kernel of inductor's beside it (the formulas made three; a copy of the
    cache for the op to write would be one more), and the same values as the eager call."""
    from torch._inductor.utils import run_and_get_code

    from deepseek_vl2.kernels.custom_ops import register_kernel_ops
    from deepseek_vl2.modeling.kv_cache import LayerCache

    g = torch.Generator().manual_seed(4)
    B, H, nope, P, R, capacity = 2, 16, 128, 64, 512, 64
    projected = torch.randn(B, 1, H * (nope + P) + R + P, generator=g).to("cuda", torch.bfloat16)
    cos, sin = (torch.randn(B, 1, P, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    norm_weight = torch.rand(R, generator=g).to("cuda", torch.bfloat16)
    slots = torch.tensor([[5], [9]], device="cuda")
    empty = torch.zeros(B, capacity, R + P, device="cuda", dtype=torch.bfloat16)

    kv_b = (torch.randn(H * (nope + 128), R, generator=g) * 0.05).to("cuda", torch.bfloat16)

    def new_tokens(projected, cos, sin, cache, slots):
        q, c_kv, k_pe = projected.split((H * (nope + P), R, P), dim=-1)
        q_nope, q_pe = q.view(q.shape[0], 1, H, nope + P).transpose(1, 2).split((nope, P), dim=-1)
        return dispatch.mla_new_tokens(q_nope, q_pe, c_kv, k_pe, cos, sin, norm_weight, 1e-6, LayerCache(cache, 1),
                                       slots, kv_b)

    register_kernel_ops()
    for rows, op in ((2, "deepseek_vl2.mla_new_tokens.default"), (1, "deepseek_vl2.mla_new_tokens_absorbed.default")):
        with torch.inference_mode():
            eager_cache, compiled_cache = empty[:rows].clone(), empty[:rows].clone()
            args = (projected[:rows], cos[:rows], sin[:rows])
            eager = new_tokens(*args, eager_cache, slots[:rows])
            torch._dynamo.reset()
            compiled, codes = run_and_get_code(torch.compile(new_tokens, fullgraph=True, dynamic=False), *args,
                                               compiled_cache, slots[:rows])
            torch._dynamo.reset()
        code = "\n".join(codes)
        assert op in code and "@triton.jit" not in code, code
        assert (eager[1] is None) == (rows > 1)  # the query is absorbed in the kernel at one row only
        for got, want in zip(compiled, eager):
            assert (got is None and want is None) or torch.equal(got, want)
        assert torch.equal(compiled_cache, eager_cache) and compiled_cache[:, 5].abs().sum() > 0
    q_nope = projected[:1, :, :H * (nope + P)].view(1, 1, H, nope + P).transpose(1, 2)[..., :nope]
    w_uk = kv_b.view(H, -1, R)[:, :nope]
    want = torch.einsum("bhsn,hnr->bhsr", q_nope.float(), w_uk.float())
    torch.testing.assert_close(compiled[1].float(), want, rtol=1.6e-2, atol=2e-2)


GREEDY = reference.Routing(top_k=2, num_experts=8, method="greedy", scoring="softmax", n_group=1, topk_group=1,
                           normalize=True, scale=1.0)


def test_add_norm_logits_on_the_cpu_is_the_sum_and_its_norm_leaving_the_logits_to_the_router():
    g = torch.Generator().manual_seed(5)
    x, delta = torch.randn(1, 2, 16, generator=g), torch.randn(1, 2, 16, generator=g)
    weight = torch.randn(16, generator=g)
    total, normed, logits = dispatch.add_norm_logits(x, delta, weight, 1e-6, torch.randn(8, 16, generator=g), GREEDY,
                                                     False)
    assert torch.equal(total, x + delta) and torch.equal(normed, reference.rms_norm(x + delta, weight, 1e-6))
    assert logits is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_add_norm_logits_is_one_kernel():
    """Inside torch.compile a MoE layer's residual sum, its norm and the router's logits stay the one
    add_norm_logits kernel (the formulas and the logits' gemv made two), with the eager call's values;
    past MAX_ROUTER_GEMV_TOKENS rows the router is left to make its logits."""
    from torch._inductor.utils import run_and_get_code

    from deepseek_vl2.kernels.custom_ops import register_kernel_ops

    g = torch.Generator().manual_seed(6)
    h, E = 2048, 64
    x, delta = (torch.randn(1, 1, h, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    norm_weight = torch.rand(h, generator=g).to("cuda", torch.bfloat16)
    router_weight = (torch.randn(E, h, generator=g) * 0.05).to("cuda", torch.bfloat16)

    def moe_input(x, delta):
        return dispatch.add_norm_logits(x, delta, norm_weight, 1e-6, router_weight, GREEDY, False)

    register_kernel_ops()
    with torch.inference_mode():
        eager = moe_input(x, delta)
        torch._dynamo.reset()
        compiled, codes = run_and_get_code(torch.compile(moe_input, fullgraph=True, dynamic=False), x, delta)
        torch._dynamo.reset()
        many = dispatch.MAX_ROUTER_GEMV_TOKENS + 1
        assert moe_input(x.expand(many, 1, h), delta.expand(many, 1, h))[2] is None
    code = "\n".join(codes)
    assert "deepseek_vl2.add_norm_logits.default" in code and "@triton.jit" not in code, code
    for got, want in zip((*compiled[:2], compiled[2].logits), (*eager[:2], eager[2].logits)):
        assert torch.equal(got, want)
    assert compiled[2].x_pairs is None and eager[2].x_pairs is None  # no int4 experts given
    assert torch.equal(eager[0], x + delta)
    torch.testing.assert_close(eager[2].logits, eager[1][0].float() @ router_weight.float().T, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_int4_experts_read_their_input_as_x_pairs_from_add_norm_logits():
    """With int4 experts on the gemv, add_norm_logits also writes the norm as the gate/up gemv's x
    pairs, and `moe` given them gives what it gives from the norm itself, to the bit, eager and
    inside torch.compile (one add_norm_logits_pairs kernel there)."""
    from torch._inductor.utils import run_and_get_code

    from deepseek_vl2.kernels.custom_ops import register_kernel_ops

    g = torch.Generator().manual_seed(8)
    h, inter, shared = 256, 128, 1
    gate_up = quantized((GREEDY.num_experts + shared, 2 * inter, h), "int4", "cuda", torch.bfloat16)
    down = quantized((GREEDY.num_experts + shared, h, inter), "int4", "cuda", torch.bfloat16, seed=9)
    x, delta = (torch.randn(1, 1, h, generator=g).to("cuda", torch.bfloat16) for _ in range(2))
    norm_weight = torch.rand(h, generator=g).to("cuda", torch.bfloat16)
    router_weight = (torch.randn(GREEDY.num_experts, h, generator=g) * 0.05).to("cuda", torch.bfloat16)

    def moe_layer(x, delta):
        total, normed, prepared = dispatch.add_norm_logits(x, delta, norm_weight, 1e-6, router_weight, GREEDY, False,
                                                           gate_up, shared)
        out = dispatch.moe(normed.view(-1, h), router_weight, None, GREEDY, shared, gate_up, down, False, prepared)
        return total, out, prepared

    register_kernel_ops()
    with torch.inference_mode():
        total, out, prepared = moe_layer(x, delta)
        assert prepared.chain == 4 and prepared.x_pairs.shape == (1, 5, h // 8)
        normed = dispatch.add_norm_logits(x, delta, norm_weight, 1e-6, router_weight, GREEDY, False)[1]
        plain = dispatch.moe(normed.view(-1, h), router_weight, None, GREEDY, shared, gate_up, down, False,
                             dispatch.MoEInput(prepared.logits))
        assert torch.equal(out, plain)
        torch._dynamo.reset()
        compiled, codes = run_and_get_code(torch.compile(moe_layer, fullgraph=True, dynamic=False), x, delta)
        torch._dynamo.reset()
    assert "deepseek_vl2.add_norm_logits_pairs.default" in "\n".join(codes)
    assert torch.equal(compiled[0], total) and torch.equal(compiled[1], out)
