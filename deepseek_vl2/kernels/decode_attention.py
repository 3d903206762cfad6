"""Decode attention kernels: one query token per row over the KV cache, split over the cached keys
(flash decoding), for MLA (over the latent cache, each latent slice read once for all heads) and
for plain multi-head attention (tiny: one program per (row, head, key slice)).

Each program takes one slice of the keys, keeps a running max and sum of the softmax, and writes
an unnormalised partial output; a second kernel combines the slices. Scores and the softmax are
float32; probabilities enter the value product in the activation dtype. Strided cache views need
no copies. When they apply is decided in dispatch.py.
"""
from typing import Optional, Tuple

import torch

from ..modeling.devices import on_tensor_device
from .custom_ops import launch_options, tl, triton

if triton is not None:
    from .custom_ops import await_earlier_kernels

    @triton.jit
    def _mla_decode_kernel(q_lat_ptr, q_pe_ptr, latent_ptr, mask_ptr, part_ptr, max_ptr, sum_ptr, kv_len, split_len,
                           scale, stride_qb, stride_qh, stride_pb, stride_ph, stride_lb, stride_ln, stride_mb,
                           H: tl.constexpr, HEADS: tl.constexpr, R: tl.constexpr, P: tl.constexpr,
                           BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        """Row b's key slice `split` for HEADS of its H heads (the group on grid axis 2)."""
        await_earlier_kernels(PDL)
        b = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        heads = tl.program_id(2) * HEADS + tl.arange(0, HEADS)
        offs_r = tl.arange(0, R)
        offs_p = tl.arange(0, P)
        q_lat = tl.load(q_lat_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_r[None, :])
        q_pe = tl.load(q_pe_ptr + b * stride_pb + heads[:, None] * stride_ph + offs_p[None, :])
        running_max = tl.full((HEADS,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((HEADS,), dtype=tl.float32)
        acc = tl.zeros((HEADS, R), dtype=tl.float32)
        start = split * split_len
        end = tl.minimum(start + split_len, kv_len)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid = offs_n < end
            rows = latent_ptr + b * stride_lb + offs_n[:, None] * stride_ln
            k_lat = tl.load(rows + offs_r[None, :], mask=valid[:, None], other=0.0)
            k_pe = tl.load(rows + R + offs_p[None, :], mask=valid[:, None], other=0.0)
            scores = tl.dot(q_lat, tl.trans(k_lat)) + tl.dot(q_pe, tl.trans(k_pe))
            bias = tl.load(mask_ptr + b * stride_mb + offs_n, mask=valid, other=0.0).to(tl.float32)
            scores = tl.where(valid[None, :], scores * scale + bias[None, :], float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            probs = tl.exp(scores - new_max[:, None])
            alpha = tl.exp(running_max - new_max)
            running_sum = running_sum * alpha + tl.sum(probs, axis=1)
            acc = acc * alpha[:, None] + tl.dot(probs.to(k_lat.dtype), k_lat)
            running_max = new_max
        base = (b * n_splits + split) * H + heads
        tl.store(part_ptr + base[:, None] * R + offs_r[None, :], acc)
        tl.store(max_ptr + base, running_max)
        tl.store(sum_ptr + base, running_sum)

    @triton.jit
    def _combined_slices(part_ptr, max_ptr, sum_ptr, b, h, n_splits, H: tl.constexpr, D: tl.constexpr,
                         BLOCK_S: tl.constexpr):
        """Row b, head h's output [D] (float32) from its key slices: each slice's partial output and
        softmax sum rescaled to the largest running max, summed, the outputs over the sums."""
        splits = tl.arange(0, BLOCK_S)
        valid = splits < n_splits
        index = (b * n_splits + splits) * H + h
        maxes = tl.load(max_ptr + index, mask=valid, other=float("-inf"))
        factors = tl.where(valid, tl.exp(maxes - tl.max(maxes, axis=0)), 0.0)
        total = tl.sum(tl.load(sum_ptr + index, mask=valid, other=0.0) * factors, axis=0)
        offs_d = tl.arange(0, D)
        parts = tl.load(part_ptr + index[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
        return tl.sum(parts * factors[:, None], axis=0) / total

    @triton.jit
    def _combine_kernel(part_ptr, max_ptr, sum_ptr, out_ptr, n_splits, H: tl.constexpr, D: tl.constexpr,
                        BLOCK_S: tl.constexpr, PDL: tl.constexpr):
        await_earlier_kernels(PDL)
        bh = tl.program_id(0)
        out = _combined_slices(part_ptr, max_ptr, sum_ptr, bh // H, bh % H, n_splits, H, D, BLOCK_S)
        tl.store(out_ptr + bh * D + tl.arange(0, D), out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _combine_values_kernel(part_ptr, max_ptr, sum_ptr, w_ptr, out_ptr, n_splits, stride_wh, stride_wv,
                               H: tl.constexpr, R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr,
                               PDL: tl.constexpr):
        """`_combine_kernel` for one (row, head), then its latent output (rounded to the activation
        dtype, as the combine stores it) times BLOCK_V rows of the head's W_UV [V, R]."""
        await_earlier_kernels(PDL)
        bh = tl.program_id(0)
        h = bh % H
        offs_v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        w = tl.load(w_ptr + h * stride_wh + offs_v[:, None] * stride_wv + tl.arange(0, R)[None, :])  # [BLOCK_V, R]
        latent = _combined_slices(part_ptr, max_ptr, sum_ptr, bh // H, h, n_splits, H, R, BLOCK_S).to(w.dtype)
        out = tl.sum(w.to(tl.float32) * latent.to(tl.float32)[None, :], axis=1)
        V = tl.num_programs(1) * BLOCK_V
        tl.store(out_ptr + bh * V + offs_v, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _mha_decode_kernel(q_ptr, kv_ptr, mask_ptr, part_ptr, max_ptr, sum_ptr, kv_len, split_len, scale,
                           stride_qb, stride_qh, stride_kb, stride_kv, stride_kh, stride_kn, stride_mb,
                           H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                           PDL: tl.constexpr):
        await_earlier_kernels(PDL)
        bh = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        b = bh // H
        h = bh % H
        offs_d = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d).to(tl.float32)
        keys = kv_ptr + b * stride_kb + (h // GROUP) * stride_kh
        running_max = float("-inf")
        running_sum = 0.0
        acc = tl.zeros((D,), dtype=tl.float32)
        start = split * split_len
        end = tl.minimum(start + split_len, kv_len)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            valid = offs_n < end
            rows = offs_n[:, None] * stride_kn + offs_d[None, :]
            k = tl.load(keys + rows, mask=valid[:, None], other=0.0)
            v = tl.load(keys + stride_kv + rows, mask=valid[:, None], other=0.0)
            bias = tl.load(mask_ptr + b * stride_mb + offs_n, mask=valid, other=0.0).to(tl.float32)
            scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale + bias
            scores = tl.where(valid, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=0))
            probs = tl.exp(scores - new_max)
            alpha = tl.exp(running_max - new_max)
            running_sum = running_sum * alpha + tl.sum(probs, axis=0)
            acc = acc * alpha + tl.sum(probs[:, None] * v.to(tl.float32), axis=0)
            running_max = new_max
        base = (b * n_splits + split) * H + h
        tl.store(part_ptr + base * D + offs_d, acc)
        tl.store(max_ptr + base, running_max)
        tl.store(sum_ptr + base, running_sum)

    def _splits(rows: int, kv_len: int, block_n: int, programs: int = 264, min_blocks: int = 4):
        """Key slices per row: about `programs` programs in all (to fill the GPU), at least
        `min_blocks` blocks of keys each."""
        wanted = max(1, -(-programs // rows))
        split_len = max(min_blocks * block_n, -(-kv_len // wanted))
        split_len = -(-split_len // block_n) * block_n
        return -(-kv_len // split_len), split_len

    def mla_tiles(rows: int):
        """(keys per block, programs, least blocks a key slice, warps, heads a program) of the MLA decode
        kernel, the best measured on an H200 at small's and base's heads (16, 32), 1 to 32 rows and
        1100 to 4200 cached latents (benchmarks/attention_configs.py --mla; benchmarks/RESULTS.md,
        twenty-seventh and thirty-fourth sessions): up to 4 rows, blocks of 64 keys in 8 warps and
        about 33 slices a row, none shorter than a block (more slices leave more partial outputs to
        combine than they save); more rows, blocks of 32 keys in 4 warps, about 264 programs of at
        least 4 blocks each. At one row, 16 heads a program: base's 32 heads in two programs a
        slice, since one row's 33 programs each reading a slice for all heads leave most SMs idle
        and wait on their reads; otherwise all heads a program (None)."""
        if rows == 1:
            return 64, 33, 1, 8, 16
        return (64, 33 * rows, 1, 8, None) if rows <= 4 else (32, 264, 4, 4, None)

    def _split_buffers(rows: int, n_splits: int, H: int, D: int, device):
        """float32 partial outputs [rows * n_splits * H, D], running maxima and sums of the splits."""
        part = torch.empty(rows * n_splits * H, D, device=device, dtype=torch.float32)
        maxes = torch.empty(rows * n_splits * H, device=device, dtype=torch.float32)
        return part, maxes, torch.empty_like(maxes)

    def _combine(part, maxes, sums, out, n_splits, H, D):
        _combine_kernel[(out.shape[0] * H,)](part, maxes, sums, out, n_splits, H=H, D=D,
                                             BLOCK_S=triton.next_power_of_2(n_splits), num_warps=4, **launch_options(out))
        return out

    def combine_values_tiles(rows: int, heads: int):
        """(value columns a program, warps) of `_combine_values_kernel`, the best measured on an H200 at
        small's and base's heads (16, 32), 2054 cached latents (benchmarks/attention_configs.py
        --mla-values; benchmarks/RESULTS.md, thirty-third and forty-sixth sessions): at one row 16 columns
        for 16 heads (64 programs; 12.10 -> 11.63 us with the decode kernel), 32 for 32 heads (16 columns
        there: 13.22 -> 16.09), 8 warps; more rows 64 columns in 4 warps."""
        if rows == 1:
            return (16, 8) if heads <= 16 else (32, 8)
        return 64, 4

    def _combine_values(part, maxes, sums, w_uv, out, n_splits, H, R):
        B, V = out.shape[0], w_uv.shape[1]
        block_v, num_warps = combine_values_tiles(B, H)
        _combine_values_kernel[(B * H, V // block_v)](
            part, maxes, sums, w_uv, out, n_splits, w_uv.stride(0), w_uv.stride(1), H=H, R=R,
            BLOCK_S=triton.next_power_of_2(n_splits), BLOCK_V=block_v, num_warps=num_warps, **launch_options(out))
        return out

    @on_tensor_device
    def mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor,
                   scale: float, tiles: Optional[Tuple[int, int, int, int, Optional[int]]] = None,
                   w_uv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q_latent [B, H, R], q_pe [B, H, P], latent [B, kv_len, R + P] (a cache view), mask
        [B or 1, kv_len] additive -> [B, H, R] = softmax(scale * q.k + mask) . latent[..., :R].
        `tiles`: (keys per block, programs, least blocks a key slice, warps, heads a program: a power of
        two of at least 16 dividing H, or None for all), default `mla_tiles(B)`.
        With `w_uv` (W_UV [H, V, R], rows of R contiguous, V a multiple of 64): [B, H, V], the output
        above (in q_latent's dtype) times each head's W_UV transposed, made by the kernel that
        combines the key slices (one launch fewer than combining, then multiplying)."""
        B, H, R = q_latent.shape
        P = q_pe.shape[-1]
        kv_len = latent.shape[1]
        block_n, programs, min_blocks, num_warps, heads = tiles or mla_tiles(B)
        heads = min(heads or H, H)
        if H % heads:
            raise ValueError(f"mla_decode: {heads} heads a program do not divide the {H} heads")
        n_splits, split_len = _splits(B, kv_len, block_n, programs, min_blocks)
        part, maxes, sums = _split_buffers(B, n_splits, H, R, latent.device)
        mask = mask.expand(B, kv_len)  # a mask built without padding has one row for the batch
        _mla_decode_kernel[(B, n_splits, H // heads)](
            q_latent, q_pe, latent, mask, part, maxes, sums, kv_len, split_len, scale, q_latent.stride(0),
            q_latent.stride(1), q_pe.stride(0), q_pe.stride(1), latent.stride(0), latent.stride(1), mask.stride(0),
            H=H, HEADS=heads, R=R, P=P, BLOCK_N=block_n, num_warps=num_warps, **launch_options(part))
        if w_uv is not None:
            return _combine_values(part, maxes, sums, w_uv, q_latent.new_empty(B, H, w_uv.shape[1]), n_splits, H, R)
        return _combine(part, maxes, sums, q_latent.new_empty(B, H, R), n_splits, H, R)

    MHA_TILES = (32, 1056, 1, 2)  # mha_decode's (keys per block, programs, least blocks a key slice, warps)

    @on_tensor_device
    def mha_decode(q: torch.Tensor, keys_values: torch.Tensor, mask: torch.Tensor, scale: float,
                   tiles: Tuple[int, int, int, int] = MHA_TILES) -> torch.Tensor:
        """q [B, H, D], keys_values [B, 2, kv_heads, kv_len, D] (a cache view), mask [B or 1, kv_len]
        additive -> [B, H, D] = softmax(scale * q.k + mask) . v. The default tiles measured best at
        tiny's shapes on an H100 (benchmarks/attention_configs.py: 9.9 us against SDPA's 13.4 us
        at batch 1, the same at batch 8); `tiles` as mla_decode's."""
        B, H, D = q.shape
        kv_heads, kv_len = keys_values.shape[2], keys_values.shape[3]
        if keys_values.stride(-1) != 1 or q.stride(-1) != 1:
            raise ValueError("mha_decode needs the head dimension contiguous")
        block_n, programs, min_blocks, num_warps = tiles
        n_splits, split_len = _splits(B * H, kv_len, block_n, programs, min_blocks)
        part, maxes, sums = _split_buffers(B, n_splits, H, D, q.device)
        mask = mask.expand(B, kv_len)  # a mask built without padding has one row for the batch
        _mha_decode_kernel[(B * H, n_splits)](
            q, keys_values, mask, part, maxes, sums, kv_len, split_len, scale, q.stride(0), q.stride(1),
            keys_values.stride(0), keys_values.stride(1), keys_values.stride(2), keys_values.stride(3),
            mask.stride(0), H=H, GROUP=H // kv_heads, D=D, BLOCK_N=block_n, num_warps=num_warps,
            **launch_options(part))
        return _combine(part, maxes, sums, q.new_empty(B, H, D), n_splits, H, D)
