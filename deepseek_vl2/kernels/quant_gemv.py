"""Gemv and dequantization kernels for quantized weights (quantization/rtn.py's layout) on CUDA.

  gemv        out[a] = W[e(a)] @ x[row(a)] for int8 or int4 weights, dequantized in registers: as
              gemv.py's kernel (expert ids, the fused silu_mul of the gate/up halves, one program
              per (output block, row a)). int4 where groups and rows are whole 32-bit words
              (groups of 8 or more columns, the real models' case): tiles of words of 8 nibbles,
              each pair of nibbles turned into two exact float16 (q - 8) by one LOP3 (OR into the
              mantissa of 1024) and one HSUB2, multiplied with x's float16 pairs by HFMA2 (2
              instructions a weight where float32 took 3) into float16 sums over a word (over 4
              words in the experts' tiles), and the zero point folded out of the inner loop: a word
              (or 4) adds scale * sum((q - 8) * x) + (zero + 8 scale) * sum(x) to its own
              accumulator, so no sum crosses threads before the end. Otherwise (groups of 2 or 4
              columns) tiles of packed bytes, q * s + z per value. int8 where rows are whole words
              (4k columns): words of 4 bytes, each byte's sign bit flipped and its bits put into
              2^23's mantissa by one LOP3, then one FADD (against a byte extraction and an
              int-to-float conversion, which runs at a quarter of the float rate); otherwise
              [BLOCK_N, BLOCK_K] byte tiles.
              int8 takes the row's scale once at the end. Products accumulate per tile position
              over the K loop and are summed across threads once, at the end.
  dequantize  the full weight in the activation dtype, one pass (what a dense projection's prefill
              multiplies with cuBLAS, and the experts' where quant_grouped_gemm cannot run).

An int4 word gemv also takes x as x pairs (x_pairs.py) that the kernel before it wrote (the words'
float16 pairs and sums, which it would otherwise make from x in every program), and the experts'
gate/up can write its output so for the down (`act_pairs_chain`).

Both are torch custom ops inside compiled regions (`custom_ops.kernel_op`). When they run is decided
in dispatch.py; tile sizes can be tuned with benchmarks/quant_gemv_configs.py.
"""
from typing import Optional

import torch

from .custom_ops import kernel_op, launch_options, tl, triton

MAGIC = 0x4B000000  # the float 2^23: its mantissa takes a byte's bits exactly (_byte)
FLIP_EVEN, FLIP_ODD = MAGIC | 0x80, MAGIC | 0x8000  # _byte's: 2^23 and the sign flip of an even / odd byte

if triton is not None:
    from .custom_ops import await_earlier_kernels
    from .gemv import silu_mul_rounded, store_rows
    from .router import PairRouting, kernel_arguments, route_outputs, routed_expert
    from .x_pairs import f16_pair, load_pairs, pairs_of, store_pairs

    @triton.jit
    def _int4_tile(q_base, s_base, z_base, rows, n_mask, byte_cols, b_mask, groups, g_mask, stride_qn, stride_sn,
                   x_even, x_odd, EVEN: tl.constexpr):
        """One tile's w * x terms for the rows `rows`, [BLOCK_N, GROUPS, GROUP / 2] (float32): the packed
        bytes of whole groups, each value dequantized with its group's scale and zero point. EVEN: the
        tile lies inside the weight (loads without masks)."""
        q_ptrs = q_base + rows[:, None, None] * stride_qn + byte_cols
        s_offs = rows[:, None] * stride_sn + groups[None, :]
        if EVEN:
            packed = tl.load(q_ptrs).to(tl.int32)
            scale = tl.load(s_base + s_offs).to(tl.float32)[:, :, None]
            zero = tl.load(z_base + s_offs).to(tl.float32)[:, :, None]
        else:
            packed = tl.load(q_ptrs, mask=n_mask[:, None, None] & b_mask, other=0).to(tl.int32)
            s_mask = n_mask[:, None] & g_mask[None, :]
            scale = tl.load(s_base + s_offs, mask=s_mask, other=0.0).to(tl.float32)[:, :, None]
            zero = tl.load(z_base + s_offs, mask=s_mask, other=0.0).to(tl.float32)[:, :, None]
        low = (packed & 15).to(tl.float32) * scale + zero
        high = (packed >> 4).to(tl.float32) * scale + zero
        return low * x_even + high * x_odd

    # A word's 8 nibbles as float16 pairs q - 8 (LOP3: OR into the mantissa of 1024, then HSUB2 takes 1032
    # off), their products with x's pairs added by HFMA2 to a float16 pair of sums (8 weights in 4 instructions).
    WORD_SUMS_PTX: tl.constexpr = tl.constexpr("""{
    .reg .b32 w0, w1, w2, w3, high, m, m16, acc;
    mov.b32 m, 0x64086408;
    mov.b32 m16, 0x64806480;
    lop3.b32 w0, $1, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 w1, $1, 0x00F000F0, 0x64006400, 0xEA;
    shr.b32 high, $1, 8;
    lop3.b32 w2, high, 0x000F000F, 0x64006400, 0xEA;
    lop3.b32 w3, high, 0x00F000F0, 0x64006400, 0xEA;
    sub.f16x2 w0, w0, m;
    sub.f16x2 w1, w1, m16;
    sub.f16x2 w2, w2, m;
    sub.f16x2 w3, w3, m16;
    fma.rn.f16x2 acc, w0, $2, $6;
    fma.rn.f16x2 acc, w1, $3, acc;
    fma.rn.f16x2 acc, w2, $4, acc;
    fma.rn.f16x2 $0, w3, $5, acc;
    }""")

    # A pair of float16 sums added in float32.
    PAIR_TOTAL_PTX: tl.constexpr = tl.constexpr("""{
    .reg .f16 lo, hi;
    .reg .f32 flo, fhi;
    mov.b32 {lo, hi}, $1;
    cvt.f32.f16 flo, lo;
    cvt.f32.f16 fhi, hi;
    add.f32 $0, flo, fhi;
    }""")

    @triton.jit
    def _f16_halves(pair):
        """An int32 of two float16 as float32 (low, high)."""
        low = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return low, (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _word_sums(words, xa, xb, xc, xd, sums, PTX: tl.constexpr):
        """`sums` (an int32 of two float16, one a half word) plus a word's products (q_i - 8) * x_i / (16 C)
        over its nibbles (q_i at bits 4i, column 8c + i), from the float16 pairs of x (x_pairs.py) for chains of
        C words: xa = (x0, x4) / (16 C), xb = (x1, x5) / (256 C), xc = (x2, x6) / (16 C), xd = (x3, x7) / (256
        C). Nibbles 0 and 4 (bits 0-3 of each half word) OR-ed into 1024's mantissa are 1024 + q, less 1032:
        q - 8; nibbles 1 and 5 (bits 4-7) are 1024 + 16 q, less 1152: 16 (q - 8), hence xb's extra 1 / 16;
        the word shifted by 8 gives nibbles 2, 6 and 3, 7 the same way. A half's float16 sum takes 4
        products from each of the C words (x's 1 / (16 C) keeps it in range up to |x| of about 30000; q - 8
        centres the products, so the rounding does not grow with a sum of q * x that the zero point
        cancels). PTX: as above in inline PTX; otherwise Triton ops that round where it does (Triton's
        interpreter runs no PTX)."""
        if PTX:
            return tl.inline_asm_elementwise(WORD_SUMS_PTX, "=r,r,r,r,r,r,r", [words, xa, xb, xc, xd, sums],
                                             dtype=tl.int32, is_pure=True, pack=1)
        a_low, a_high = _f16_halves(xa)
        b_low, b_high = _f16_halves(xb)
        c_low, c_high = _f16_halves(xc)
        d_low, d_high = _f16_halves(xd)
        low, high = _f16_halves(sums)
        return f16_pair(_half_word_sum(words, a_low, b_low, c_low, d_low, low),
                        _half_word_sum(words >> 16, a_high, b_high, c_high, d_high, high), False)

    @triton.jit
    def _half_word_sum(bits, a, b, c, d, t):
        """_word_sums for one half word (bits 0-15 of `bits`) onto t, by Triton ops: each product and sum
        rounded to float16 as HFMA2 rounds it."""
        t = (((bits & 15) - 8).to(tl.float32) * a + t).to(tl.float16).to(tl.float32)
        t = (((bits & 0xF0) - 128).to(tl.float32) * b + t).to(tl.float16).to(tl.float32)
        t = ((((bits >> 8) & 15) - 8).to(tl.float32) * c + t).to(tl.float16).to(tl.float32)
        return ((((bits >> 8) & 0xF0) - 128).to(tl.float32) * d + t).to(tl.float16).to(tl.float32)

    @triton.jit
    def _pair_total(sums, PTX: tl.constexpr):
        """An int32 of two float16 as the float32 sum of the two."""
        if PTX:
            return tl.inline_asm_elementwise(PAIR_TOTAL_PTX, "=f,r", [sums], dtype=tl.float32, is_pure=True, pack=1)
        low, high = _f16_halves(sums)
        return low + high

    @triton.jit
    def _x_pairs(x_row, k0, K, GROUPS: tl.constexpr, WPG: tl.constexpr, CHAIN: tl.constexpr, EVEN: tl.constexpr,
                 PTX: tl.constexpr):
        """x's columns k0 + [0, GROUPS * WPG * 8) as _word_sums' four float16 pair tensors [GROUPS, WPG]
        (column 8c + i of x in word c's pairs; CHAIN words to a chain), and x's sum per word (float32):
        x_pairs.pairs_of of the loaded columns."""
        ks = k0 + tl.arange(0, GROUPS * WPG * 8)
        if EVEN:
            xv = tl.load(x_row + ks).to(tl.float32)
        else:
            xv = tl.load(x_row + ks, mask=ks < K, other=0.0).to(tl.float32)
        return pairs_of(tl.reshape(xv, (GROUPS, WPG, 2, 2, 2)), CHAIN, PTX)

    @triton.jit
    def _word_halves(t, SHAPE: tl.constexpr):
        """t [..., W] as its even and odd words, two [..., W / 2] (SHAPE: t's shape with W / 2 last)."""
        return tl.split(tl.reshape(t, SHAPE + (2,)))

    @triton.jit
    def _chained_sums(words, xa, xb, xc, xd, x_sum, CHAIN: tl.constexpr, PTX: tl.constexpr):
        """[BLOCK_N, GROUPS, WPG] words and their x pairs and sums (broadcast to the words' shape) -> the
        _word_sums of each CHAIN (1 or 4) consecutive words, chained in one float16 pair, as float32, and
        their x sums ([BLOCK_N, GROUPS, WPG / CHAIN] both)."""
        if CHAIN == 1:
            return _pair_total(_word_sums(words, xa, xb, xc, xd, tl.zeros_like(words), PTX), PTX), x_sum
        else:  # words 4j, 4j + 2, 4j + 1, 4j + 3
            HALF: tl.constexpr = (words.shape[0], words.shape[1], words.shape[2] // 2)
            QUARTER: tl.constexpr = (words.shape[0], words.shape[1], words.shape[2] // 4)
            w0, w1 = _word_halves(words, HALF)
            a0, a1 = _word_halves(xa, HALF)
            b0, b1 = _word_halves(xb, HALF)
            c0, c1 = _word_halves(xc, HALF)
            d0, d1 = _word_halves(xd, HALF)
            s0, s1 = _word_halves(x_sum, HALF)
            w00, w02 = _word_halves(w0, QUARTER)
            w01, w03 = _word_halves(w1, QUARTER)
            a00, a02 = _word_halves(a0, QUARTER)
            a01, a03 = _word_halves(a1, QUARTER)
            b00, b02 = _word_halves(b0, QUARTER)
            b01, b03 = _word_halves(b1, QUARTER)
            c00, c02 = _word_halves(c0, QUARTER)
            c01, c03 = _word_halves(c1, QUARTER)
            d00, d02 = _word_halves(d0, QUARTER)
            d01, d03 = _word_halves(d1, QUARTER)
            t0, t2 = _word_halves(s0 + s1, QUARTER)
            sums = _word_sums(w00, a00, b00, c00, d00, tl.zeros_like(w00), PTX)
            sums = _word_sums(w02, a02, b02, c02, d02, sums, PTX)
            sums = _word_sums(w01, a01, b01, c01, d01, sums, PTX)
            sums = _word_sums(w03, a03, b03, c03, d03, sums, PTX)
            return _pair_total(sums, PTX), t0 + t2

    @triton.jit
    def _int4_word_tile(acc, q_base, s_base, z_base, rows, n_mask, words_cols, groups, stride_qn, stride_sn, K,
                        xa, xb, xc, xd, x_sum, GROUP: tl.constexpr, CHAIN: tl.constexpr, EVEN: tl.constexpr,
                        PTX: tl.constexpr):
        """acc [BLOCK_N, GROUPS, GROUP / (8 CHAIN)] plus one tile's sums over each CHAIN words (float32)
        from [BLOCK_N, GROUPS, GROUP / 8] words: scale * sum((q - 8) * x) + (zero + 8 * scale) * sum(x)
        (_word_sums' 1 / (16 CHAIN) taken back in the scale), added to acc one term at a time (two FFMA
        for CHAIN words)."""
        w_ptrs = q_base + rows[:, None, None] * stride_qn + words_cols[None, :, :]
        s_offs = rows[:, None] * stride_sn + groups[None, :]
        if EVEN:
            words = tl.load(w_ptrs)
            scale = tl.load(s_base + s_offs).to(tl.float32)
            zero = tl.load(z_base + s_offs).to(tl.float32)
        else:
            words = tl.load(w_ptrs, mask=n_mask[:, None, None] & (words_cols < K // 8)[None, :, :], other=0)
            s_mask = n_mask[:, None] & (groups < K // GROUP)[None, :]
            scale = tl.load(s_base + s_offs, mask=s_mask, other=0.0).to(tl.float32)
            zero = tl.load(z_base + s_offs, mask=s_mask, other=0.0).to(tl.float32)
        t, t_sum = _chained_sums(words, tl.broadcast_to(xa[None, :, :], words.shape),
                                 tl.broadcast_to(xb[None, :, :], words.shape),
                                 tl.broadcast_to(xc[None, :, :], words.shape),
                                 tl.broadcast_to(xd[None, :, :], words.shape),
                                 tl.broadcast_to(x_sum[None, :, :], words.shape), CHAIN, PTX)
        return acc + t * (scale * (16.0 * CHAIN))[:, :, None] + t_sum * (zero + 8.0 * scale)[:, :, None]

    @triton.jit
    def _int8_tile(q_base, rows, n_mask, offs_k, k_mask, stride_qn, x):
        """One tile's q * x terms, [BLOCK_N, BLOCK_K] (float32; the row's scale comes at the end)."""
        w = tl.load(q_base + rows[:, None] * stride_qn + offs_k, mask=n_mask[:, None] & k_mask, other=0)
        return w.to(tl.float32) * x

    @triton.jit
    def _byte(words, flip_magic, i: tl.constexpr):
        """b * 256^(i % 2) as float32, exactly, for the signed byte b at column 4c + i of word c: the
        byte's bits, sign bit flipped (b + 128), put into the mantissa of 2^23 by one XOR with
        `flip_magic` (FLIP_EVEN or FLIP_ODD: a kernel argument, so that the AND and the XOR are one
        LOP3; bytes 2 and 3 shifted down by 16 first), minus 2^23 + 128 * 256^(i % 2)."""
        if i < 2:
            bits = (words & (255 << (8 * i))) ^ flip_magic
        else:
            bits = ((words >> 16) & (255 << (8 * (i - 2)))) ^ flip_magic
        return bits.to(tl.float32, bitcast=True) - (8388736.0 if i % 2 == 0 else 8421376.0)

    @triton.jit
    def _x_by_byte(x_row, k0, K, WORDS_K: tl.constexpr, EVEN: tl.constexpr):
        """x's columns k0 + [0, 4 * WORDS_K) as four [WORDS_K] tensors, x_i holding column 4c + i
        divided by _byte's 256^(i % 2)."""
        ks = k0 + tl.arange(0, WORDS_K * 4)
        if EVEN:
            xv = tl.load(x_row + ks).to(tl.float32)
        else:
            xv = tl.load(x_row + ks, mask=ks < K, other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(tl.reshape(xv, (WORDS_K, 2, 2)))  # by bit 0 of i, then bit 1
        x0, x2 = tl.split(x_even)
        x1, x3 = tl.split(x_odd)
        return x0, x1 * 0.00390625, x2, x3 * 0.00390625

    @triton.jit
    def _int8_word_tile(acc, q_base, rows, n_mask, words_cols, stride_qn, K, flip_even, flip_odd, x0, x1, x2, x3,
                        EVEN: tl.constexpr):
        """acc [BLOCK_N, BLOCK_K / 4] plus one tile's q * x terms per word (float32; the row's scale
        comes at the end), from int8 weights read as 32-bit words of 4 bytes."""
        w_ptrs = q_base + rows[:, None] * stride_qn + words_cols[None, :]
        if EVEN:
            words = tl.load(w_ptrs)
        else:
            words = tl.load(w_ptrs, mask=n_mask[:, None] & (words_cols < K // 4)[None, :], other=0)
        acc += _byte(words, flip_even, 0) * x0
        acc += _byte(words, flip_odd, 1) * x1
        acc += _byte(words, flip_even, 2) * x2
        acc += _byte(words, flip_odd, 3) * x3
        return acc

    @triton.jit
    def _quant_gemv_kernel(x_ptr, q_ptr, s_ptr, z_ptr, ids_ptr, out_ptr, N, K, rows_per_id, flip_even, flip_odd,
                           stride_x, stride_qe, stride_qn, stride_se, stride_sn, stride_out,
                           logits_ptr, bias_ptr, weights_ptr, n_experts, route_scale, INT4: tl.constexpr,
                           WORDS: tl.constexpr, GROUP: tl.constexpr, HAS_IDS: tl.constexpr, SILU_MUL: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN: tl.constexpr,
                           STAGES: tl.constexpr, TOP_K: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                           NORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, CHAIN: tl.constexpr, PTX: tl.constexpr,
                           X_PAIRS: tl.constexpr, PAIRS_OUT: tl.constexpr, OUT_CHAIN: tl.constexpr,
                           ACT_BF16: tl.constexpr, PDL: tl.constexpr):
        """Products are summed per tile position across the K loop and reduced once at the end (no
        cross-thread reduction per tile). WORDS: int4 or int8 read as int32 words (strides in words),
        with STAGES > 1 the word tiles of the next iterations loaded ahead (asynchronous copies). PTX:
        int4 words' products in inline PTX (a GPU), else in Triton ops (the interpreter: tensors on the CPU).
        TOP_K > 0: each program picks its pair's expert from the router's logits (router.routed_expert;
        the programs of the first output block write the pairs' ids and weights)."""
        await_earlier_kernels(PDL)
        pid_n = tl.program_id(0)
        a = tl.program_id(1)
        row = a // rows_per_id
        q_base = q_ptr
        s_base = s_ptr
        z_base = z_ptr
        if HAS_IDS:
            if TOP_K > 0:
                expert = routed_expert(logits_ptr, bias_ptr, ids_ptr, weights_ptr, a, rows_per_id, n_experts,
                                       route_scale, pid_n == 0, TOP_K, SIGMOID, HAS_BIAS, NORMALIZE,
                                       BLOCK_E).to(tl.int64)
            else:
                expert = tl.load(ids_ptr + a).to(tl.int64)
            q_base = q_ptr + expert * stride_qe
            s_base = s_ptr + expert * stride_se
            z_base = z_ptr + expert * stride_se
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        x_row = x_ptr + row * stride_x
        if WORDS and INT4:
            GROUPS: tl.constexpr = BLOCK_K // GROUP
            WPG: tl.constexpr = GROUP // 8
            tile_groups = tl.arange(0, GROUPS)
            tile_words = tile_groups[:, None] * WPG + tl.arange(0, WPG)[None, :]  # [GROUPS, WPG]
            acc3 = tl.zeros((BLOCK_N, GROUPS, WPG // CHAIN), dtype=tl.float32)
            acc3_up = tl.zeros((BLOCK_N, GROUPS, WPG // CHAIN), dtype=tl.float32)
            for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                if X_PAIRS:
                    xa, xb, xc, xd, x_sum = load_pairs(x_row, k0, K, GROUPS, WPG, EVEN)
                else:
                    xa, xb, xc, xd, x_sum = _x_pairs(x_row, k0, K, GROUPS, WPG, CHAIN, EVEN, PTX)
                words_cols = k0 // 8 + tile_words
                groups = k0 // GROUP + tile_groups
                acc3 = _int4_word_tile(acc3, q_base, s_base, z_base, offs_n, n_mask, words_cols, groups, stride_qn,
                                       stride_sn, K, xa, xb, xc, xd, x_sum, GROUP, CHAIN, EVEN, PTX)
                if SILU_MUL:
                    acc3_up = _int4_word_tile(acc3_up, q_base, s_base, z_base, offs_n + N, n_mask, words_cols, groups,
                                              stride_qn, stride_sn, K, xa, xb, xc, xd, x_sum, GROUP, CHAIN, EVEN, PTX)
            acc = tl.sum(tl.sum(acc3, axis=2), axis=1)
            acc_up = tl.sum(tl.sum(acc3_up, axis=2), axis=1)
        elif WORDS:  # int8 words
            tile_words = tl.arange(0, BLOCK_K // 4)
            acc2 = tl.zeros((BLOCK_N, BLOCK_K // 4), dtype=tl.float32)
            acc2_up = tl.zeros((BLOCK_N, BLOCK_K // 4), dtype=tl.float32)
            for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                x0, x1, x2, x3 = _x_by_byte(x_row, k0, K, BLOCK_K // 4, EVEN)
                words_cols = k0 // 4 + tile_words
                acc2 = _int8_word_tile(acc2, q_base, offs_n, n_mask, words_cols, stride_qn, K, flip_even, flip_odd,
                                       x0, x1, x2, x3, EVEN)
                if SILU_MUL:
                    acc2_up = _int8_word_tile(acc2_up, q_base, offs_n + N, n_mask, words_cols, stride_qn, K, flip_even,
                                              flip_odd, x0, x1, x2, x3, EVEN)
            acc = tl.sum(acc2, axis=1)
            acc_up = tl.sum(acc2_up, axis=1)
        elif INT4:
            GROUPS: tl.constexpr = BLOCK_K // GROUP
            acc3 = tl.zeros((BLOCK_N, GROUPS, GROUP // 2), dtype=tl.float32)
            acc3_up = tl.zeros((BLOCK_N, GROUPS, GROUP // 2), dtype=tl.float32)
            tile_groups = tl.arange(0, GROUPS)
            # [1, GROUPS, GROUP / 2]: x is loaded in the layout of the weight tiles it multiplies
            tile_bytes = tile_groups[None, :, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, None, :]
            for k0 in range(0, K, BLOCK_K):
                byte_cols = k0 // 2 + tile_bytes
                b_mask = byte_cols < K // 2
                if EVEN:
                    x_even = tl.load(x_row + 2 * byte_cols).to(tl.float32)
                    x_odd = tl.load(x_row + 2 * byte_cols + 1).to(tl.float32)
                else:
                    x_even = tl.load(x_row + 2 * byte_cols, mask=b_mask, other=0.0).to(tl.float32)
                    x_odd = tl.load(x_row + 2 * byte_cols + 1, mask=b_mask, other=0.0).to(tl.float32)
                groups = k0 // GROUP + tile_groups
                g_mask = groups < K // GROUP
                acc3 += _int4_tile(q_base, s_base, z_base, offs_n, n_mask, byte_cols, b_mask, groups, g_mask,
                                   stride_qn, stride_sn, x_even, x_odd, EVEN)
                if SILU_MUL:
                    acc3_up += _int4_tile(q_base, s_base, z_base, offs_n + N, n_mask, byte_cols, b_mask, groups,
                                          g_mask, stride_qn, stride_sn, x_even, x_odd, EVEN)
            acc = tl.sum(tl.sum(acc3, axis=2), axis=1)
            acc_up = tl.sum(tl.sum(acc3_up, axis=2), axis=1)
        else:
            acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            acc2_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)[None, :]
                k_mask = offs_k < K
                # x loaded once per tile row (from L1): in the weight tile's own layout, no conversion
                x = tl.load(x_row + offs_k + 0 * offs_n[:, None], mask=k_mask, other=0.0).to(tl.float32)
                acc2 += _int8_tile(q_base, offs_n, n_mask, offs_k, k_mask, stride_qn, x)
                if SILU_MUL:
                    acc2_up += _int8_tile(q_base, offs_n + N, n_mask, offs_k, k_mask, stride_qn, x)
            acc = tl.sum(acc2, axis=1)
            acc_up = tl.sum(acc2_up, axis=1)
        if not INT4:  # int8: one scale per output row
            acc *= tl.load(s_base + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
            if SILU_MUL:
                acc_up *= tl.load(s_base + (offs_n + N) * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
        if PAIRS_OUT:  # silu(gate) * up rounded as store_rows rounds it (in the activations' dtype), as x pairs
            if ACT_BF16:
                act = silu_mul_rounded(acc, acc_up, tl.bfloat16).to(tl.bfloat16).to(tl.float32)
            else:
                act = silu_mul_rounded(acc, acc_up, tl.float16).to(tl.float16).to(tl.float32)
            store_pairs(out_ptr + a * stride_out, pid_n * (BLOCK_N // 8), N // 8, act, BLOCK_N // 8, OUT_CHAIN, PTX)
        else:
            store_rows(out_ptr + a * stride_out, offs_n, n_mask, acc, acc_up, SILU_MUL)

    @triton.jit
    def _dequantize_kernel(q_ptr, s_ptr, z_ptr, out_ptr, R, K, INT4: tl.constexpr, GROUP: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        await_earlier_kernels(PDL)
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = rows < R
        groups = K // GROUP
        out_type = out_ptr.dtype.element_ty
        if INT4:  # [BLOCK_R, GROUPS, GROUP / 2] bytes of whole groups, a scale and zero point per group
            GROUPS: tl.constexpr = BLOCK_K // GROUP
            g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
            mask = r_mask[:, None, None] & (g < groups)[None, :, None]
            byte_cols = g[None, :, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, None, :]
            packed = tl.load(q_ptr + rows[:, None, None] * (K // 2) + byte_cols, mask=mask, other=0).to(tl.int32)
            s_offs = rows[:, None] * groups + g[None, :]
            s_mask = r_mask[:, None] & (g < groups)[None, :]
            scale = tl.load(s_ptr + s_offs, mask=s_mask, other=0.0).to(tl.float32)[:, :, None]
            zero = tl.load(z_ptr + s_offs, mask=s_mask, other=0.0).to(tl.float32)[:, :, None]
            low = (packed & 15).to(tl.float32) * scale + zero
            high = (packed >> 4).to(tl.float32) * scale + zero
            values = tl.interleave(low, high)  # columns 2j, 2j+1
            cols = g[None, :, None] * GROUP + tl.arange(0, GROUP)[None, None, :]
            tl.store(out_ptr + rows[:, None, None] * K + cols, values.to(out_type), mask=mask)
        else:
            offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
            mask = r_mask[:, None] & (offs_k < K)[None, :]
            q = tl.load(q_ptr + rows[:, None] * K + offs_k[None, :], mask=mask, other=0).to(tl.float32)
            scale = tl.load(s_ptr + rows, mask=r_mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + rows[:, None] * K + offs_k[None, :], (q * scale[:, None]).to(out_type), mask=mask)

    def gemv_tiles(int4: bool, words: bool, experts: bool, silu_mul: bool, N: int, K: int, rows: int, group: int):
        """(output rows per program, input columns per tile, warps, pipeline stages). The best measured inside
        a CUDA graph on an H200 (benchmarks/quant_gemv_configs.py, benchmarks/RESULTS.md 2026-11-30 to
        2026-12-01): int4 word experts in 512-column tiles of 4 (gate/up) or 8 (down) output rows and 2 warps,
        except at one token (up to 8 (row, expert) pairs): gate/up in 8 rows of 256 columns, one warp, the
        next two tiles loaded ahead; down in 16 rows of 256 columns (128 where 256 does not divide the row:
        tiny, small), one warp, two tiles ahead (thirty-eighth session), three for small's 1408-column rows
        (forty-fourth session). int4 word projections of one row: over 5120 columns (a dense layer's down) one
        output row per program of 4 warps in 2048-column tiles for groups of 64 (tiny, small), 4 rows of 1024
        columns and 2 warps, 3 stages, for groups of 128 (base); up to 8192 outputs (the attention
        projections) 4 rows (8 from 4096 outputs) of 512 columns with 2 warps, or of 256 columns with one warp
        where 512 does not divide the row (tiny), 3 stages. Other int4 word projections 8 rows of 512 columns,
        2 warps, with fewer rows per program where the grid would otherwise not give each of the 132 SMs two
        programs. int8 words at one token (one row, or up to 8 (row, expert) pairs), loaded 3 stages ahead
        (small's shapes swept, RESULTS.md fifteenth session): experts and projections of 4096 or more outputs
        in 8 rows of 256 columns and one warp; long rows (over 8192 columns: a dense down) in 4 rows of 1024
        columns, 2 warps; the rest 2 rows of 1024 columns, one warp. Swept again at 16 and 32 rows
        (forty-fourth session): the attention's input projections (3072-8192 outputs) in 8 rows of 512
        columns, 2 warps; small's expert down (rows of 1408 columns) in 16 rows; small's LM head (2048
        columns) in 8 rows of 1024 columns (tiny's and base's heads, whose rows are not whole 1024-column
        tiles, and the dense layers' gate/up were slower so). Other int8 words take int4 words' tiles without
        the loading ahead. Bytes (int4 groups under 8 columns, int8 rows not a multiple of 4): int4 with 8
        output rows per program, int8 expert gate/up with 2, elsewhere about 2 KB of weight bytes per tile,
        rows halved as above."""
        if words and not int4 and (rows == 1 or experts and rows <= 8):  # int8 words, one token
            if experts:  # 16 rows for a down whose rows end in a partial tile past 1024 columns (small's)
                return (16, 256, 1, 3) if not silu_mul and K % 256 and K > 1024 else (8, 256, 1, 3)
            if K > 8192:
                return 4, 1024, 2, 3
            if N > 65536 and K % 1024 == 0:  # a vocabulary-sized head on whole 1024-column tiles (small's)
                return 8, 1024, 1, 3
            if 3072 <= N <= 8192:  # the attention's input projections
                return 8, 512, 2, 3
            return (8, 256, 1, 3) if N >= 4096 else (2, 1024, 1, 3)
        if words and experts:
            if int4 and rows <= 8:  # one token
                if silu_mul:
                    return 8, 256, 1, 3
                return (16, 256, 1, 3) if K % 256 == 0 else (16, 128, 1, 4 if K > 1024 else 3)
            return (4 if silu_mul else 8), 512, 2, 1
        if int4 and not words:
            return 8, (256 if experts and silu_mul else 512 if experts or silu_mul else 1024), 4, 1
        if experts and silu_mul:
            return 2, 256, 2, 1
        if int4 and words and rows == 1 and K > 5120:  # a dense layer's down projection
            return (1, 2048, 4, 1) if group < 128 else (4, 1024, 2, 3)
        if int4 and words and rows == 1 and N <= 8192:  # attention projections
            block_k, num_warps = (512, 2) if K % 512 == 0 else (256, 1)
            return (4 if N < 4096 else 8), block_k, num_warps, 3
        block_n, block_k, num_warps = (8, 512, 2) if words else (4, 512, 4)
        while block_n > 1 and triton.cdiv(N, block_n) * rows < 2 * 132:
            block_n //= 2
        return block_n, block_k, num_warps, 1

    def word_chain(experts: bool, group: int, block_n: int, block_k: int, num_warps: int) -> int:
        """int4 words whose float16 sums are chained before their float32 conversion: 4 in the experts'
        tiles (where a group has 4 words or more and a thread holds 4 or more of a tile's words), else 1.
        On an H200 (benchmarks/RESULTS.md, forty-sixth session) chains of 4 made the experts' gemvs 1-7%
        faster; the dense projections' were as fast or slower (a dense layer's down in 2048-column tiles
        of one row 40% slower at chains of 2)."""
        return 4 if experts and group >= 32 and block_n * block_k >= 1024 * num_warps else 1

    def act_pairs_chain(h: int, intermediate: int, gate_up_group: int, down_group: int, pairs: int) -> int:
        """The chain (word_chain) of the int4 expert down gemv over `pairs` (token, expert) pairs, for
        which the gate/up gemv before it writes its silu_mul output as that gemv's x pairs (x_pairs); 0
        where it does not: either stack not in int4 words, the gate/up's tile not whole words of output
        (BLOCK_N a multiple of 8: the one-token tile), or the down's tile 256 columns or more. The down
        then loads each word's four float16 pairs and its sum instead of making them from bf16
        activations in every program. In its 128-column one-token tiles (tiny's and small's rows, not
        whole 256-column tiles) each thread makes the pairs of its own words (small: 307 -> 211 loop
        instructions); on an H200 (benchmarks/RESULTS.md, forty-seventh session) small's down 7.9 ->
        7.05 us and its decode step's gemvs 788 -> 773 us, the same output to the bit. Base's 256-column
        tiles exchange the pairs through shared memory: its down 8.43 -> 8.39 us, its step's gemvs 9 us
        slower with the pairs."""
        if gate_up_group % 8 or down_group % 8 or expert_word_tile(True, intermediate, h, pairs, gate_up_group)[0] % 8:
            return 0
        _, block_k, _, chain = expert_word_tile(False, h, intermediate, pairs, down_group)
        return chain if block_k < 256 else 0

    def gate_up_pairs_chain(h: int, intermediate: int, group: int, pairs: int) -> int:
        """The chain (word_chain) of the int4 expert gate/up gemv (silu_mul) over `pairs` (token, expert)
        pairs at its default tiles, for which the kernel before it writes x as x pairs; 0 where the stack
        is not in int4 words."""
        return 0 if group % 8 else expert_word_tile(True, intermediate, h, pairs, group)[3]

    def expert_word_tile(silu_mul: bool, N: int, K: int, pairs: int, group: int) -> tuple:
        """The int4 word expert gemv's default tile over `pairs` (token, expert) pairs of N outputs and K
        columns, as gemv_launch runs it: (BLOCK_N, BLOCK_K in whole groups, warps, word_chain)."""
        block_n, block_k, num_warps, _ = gemv_tiles(True, True, True, silu_mul, N, K, pairs, group)
        block_k = max(block_k, group)
        return block_n, block_k, num_warps, word_chain(True, group, block_n, block_k, num_warps)

    def gemv_launch(x, qweight, scale, zero, ids, rows_per_id, silu_mul, block_n=None, block_k=None,
                    num_warps=None, stages=1, routing=None, pairs_chain=0, x_chain=0, out_dtype=None):
        """out [rows, N] in x's dtype (`out_dtype` where x is pairs); qweight [E, N', K or K/2] with ids,
        else [N', K or K/2]. Tiles from gemv_tiles unless given (stages apply to word tiles only). With
        `routing` (a router.PairRouting) the kernel picks the experts and writes them into `ids` (empty,
        [T, rows_per_id]). `pairs_chain` > 0 (int4 words, silu_mul, BLOCK_N a multiple of 8): out is
        the x pairs of the silu_mul output for an int4 gemv whose tiles chain that many words (int32
        [rows, 5, N / 8], x_pairs.py). x int32: such pairs, scaled for chains of `x_chain` words."""
        int4 = zero is not None
        N = qweight.shape[-2] // 2 if silu_mul else qweight.shape[-2]
        rows = ids.numel() if ids is not None else x.shape[0]
        K = qweight.shape[-1] * (2 if int4 else 1)
        group = K // scale.shape[-1]
        # whole 32-bit words per group and row (int4: groups of 8 or more columns; int8: rows of 4k columns)
        words = group % 8 == 0 if int4 else K % 4 == 0
        if block_n is None:
            block_n, block_k, num_warps, stages = gemv_tiles(int4, words, ids is not None, silu_mul, N, K, rows,
                                                                 group)
        if int4:
            block_k = max(block_k, group)  # whole groups per tile (both are powers of two)
        chain = word_chain(ids is not None, group, block_n, block_k, num_warps) if int4 and words else 1
        x_pairs = x.dtype == torch.int32
        if x_pairs and out_dtype is None:
            raise ValueError("a gemv of x pairs needs out_dtype, the activations' dtype")
        if x_pairs and not (int4 and words and chain == x_chain and tuple(x.shape[1:]) == (5, K // 8)):
            raise ValueError(f"x pairs [rows, 5, K / 8] scaled for chains of {x_chain} words need an int4 word "
                             f"gemv of {K} columns whose tile chains as many; got {tuple(x.shape)}, int4 "
                             f"{int4}, words {words}, chain {chain}")
        if pairs_chain and not (int4 and words and silu_mul and block_n % 8 == 0):
            raise ValueError("x pairs are written by int4 word gemvs with silu_mul in tiles of whole words "
                             f"(BLOCK_N a multiple of 8), not BLOCK_N {block_n}, int4 {int4}, words {words}")
        q = qweight.view(torch.int32) if words else qweight
        out = _gemv_out(x, qweight, ids, silu_mul, pairs_chain, out_dtype)
        grid = (triton.cdiv(N, block_n), rows)
        _quant_gemv_kernel[grid](
            x, q, scale, zero if int4 else scale, ids if ids is not None else x, out, N, K, rows_per_id, FLIP_EVEN,
            FLIP_ODD, x.stride(0), q.stride(0) if ids is not None else 0, q.stride(-2),
            scale.stride(0) if ids is not None else 0, scale.stride(-2), out.stride(0), INT4=int4, WORDS=words,
            GROUP=group, HAS_IDS=ids is not None, SILU_MUL=silu_mul, BLOCK_N=block_n, BLOCK_K=block_k,
            EVEN=N % block_n == 0 and K % block_k == 0, STAGES=stages, **kernel_arguments(routing, x), CHAIN=chain,
            PTX=x.is_cuda, X_PAIRS=x_pairs, PAIRS_OUT=pairs_chain > 0, OUT_CHAIN=max(pairs_chain, 1),
            ACT_BF16=(out_dtype or x.dtype) == torch.bfloat16, num_warps=num_warps, **launch_options(x))
        return out

    def _gemv_out(x, qweight, ids, silu_mul, pairs_chain, out_dtype):
        rows = ids.numel() if ids is not None else x.shape[0]
        N = qweight.shape[-2] // 2 if silu_mul else qweight.shape[-2]
        if pairs_chain:
            return x.new_empty(rows, 5, N // 8, dtype=torch.int32)
        return x.new_empty(rows, N, dtype=out_dtype or x.dtype)

    def _gemv_fake(x, qweight, scale, zero, ids, rows_per_id, silu_mul, pairs_chain=0, x_chain=0, out_dtype=None):
        return _gemv_out(x, qweight, ids, silu_mul, pairs_chain, out_dtype)

    @kernel_op("quant_gemv", _gemv_fake)
    def gemv(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
             ids: Optional[torch.Tensor], rows_per_id: int, silu_mul: bool, pairs_chain: int = 0, x_chain: int = 0,
             out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return gemv_launch(x.contiguous(), qweight, scale, zero, ids, rows_per_id, silu_mul, pairs_chain=pairs_chain,
                           x_chain=x_chain, out_dtype=out_dtype)

    def _routed_gate_up_fake(x, qweight, scale, zero, logits, bias, top_k, pairs_per_token, sigmoid, normalize,
                             route_scale, pairs_chain=0, x_chain=0, out_dtype=None):
        ids, weights = route_outputs(x.shape[0], pairs_per_token, x.device)
        return _gemv_out(x, qweight, ids, True, pairs_chain, out_dtype), ids, weights

    @kernel_op("quant_routed_gate_up", _routed_gate_up_fake)
    def routed_gate_up(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                       logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, pairs_per_token: int,
                       sigmoid: bool, normalize: bool, route_scale: float, pairs_chain: int = 0, x_chain: int = 0,
                       out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The expert gate/up gemv with silu_mul whose programs route (router.routed_expert): x [T, h],
        the int8 / int4 stack [E', 2I, h], the router's float32 logits [T, E] -> (silu(gate) * up
        [T * pairs, I] in pair order, or its x pairs for `pairs_chain` (gemv_launch), ids [T, pairs]
        (int64), weights [T, pairs] (float32)), as router.route and then gemv(x, ..., ids, pairs, True)
        give them. x may be x pairs, scaled for chains of `x_chain` words (`out_dtype`: the activations'
        dtype)."""
        ids, weights = route_outputs(x.shape[0], pairs_per_token, x.device)
        routing = PairRouting(logits.contiguous(), bias, top_k, sigmoid, normalize, route_scale, weights)
        act = gemv_launch(x.contiguous(), qweight, scale, zero, ids, pairs_per_token, True, routing=routing,
                          pairs_chain=pairs_chain, x_chain=x_chain, out_dtype=out_dtype)
        return act, ids, weights

    def _dequantize_fake(qweight, scale, zero, dtype):
        K = qweight.shape[-1] * (2 if zero is not None else 1)
        return scale.new_empty(*qweight.shape[:-1], K, dtype=dtype)

    @kernel_op("dequantize", _dequantize_fake)
    def dequantize(qweight: torch.Tensor, scale: torch.Tensor, zero: Optional[torch.Tensor],
                   dtype: torch.dtype) -> torch.Tensor:
        """The full weight [..., N, K] in `dtype` (contiguous quantized storage, as QuantizedWeight keeps it)."""
        int4 = zero is not None
        K = qweight.shape[-1] * (2 if int4 else 1)
        out = torch.empty(*qweight.shape[:-1], K, device=qweight.device, dtype=dtype)
        R = out.numel() // K
        group = K // scale.shape[-1]
        block_r, block_k = 16, max(256, group) if int4 else 256  # int4: whole groups per program
        if R:
            _dequantize_kernel[(triton.cdiv(R, block_r), triton.cdiv(K, block_k))](
                qweight, scale, zero if int4 else scale, out, R, K, INT4=int4, GROUP=group,
                BLOCK_R=block_r, BLOCK_K=block_k, num_warps=4, **launch_options(out))
        return out
