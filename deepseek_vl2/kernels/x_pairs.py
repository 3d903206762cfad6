"""x pairs: a row of activations as the int4 word gemv's inner loop multiplies it (quant_gemv.py), made
once by the kernel that produces the row instead of in every program of the gemv that reads it.

The int4 gemv multiplies a word of 8 nibbles (columns 8c .. 8c + 7) with float16 pairs of x: (x0, x4)
/ (16 C), (x1, x5) / (256 C), (x2, x6) / (16 C), (x3, x7) / (256 C) (low half first; C the number of
words its tile chains into one float16 sum, quant_gemv.word_chain), and takes the word's float32 sum
((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)) for the zero point. A row of K columns as x pairs
is int32 [5, K / 8]: the four pair planes, then the sums' float32 bits. Made from the same float32
values in the same order, they are the pairs the gemv would make itself, to the bit.

Written by the int4 experts' gate/up gemv for the down gemv after it (quant_gemv.act_pairs_chain)
and by router.add_norm_logits for the gate/up gemv (dispatch.add_norm_logits).
"""
import torch

from .custom_ops import tl, triton

PLANES = 5


def empty_pairs(rows: int, columns: int, device) -> torch.Tensor:
    """Room for `rows` rows of `columns` (a multiple of 8) as x pairs: int32 [rows, 5, columns / 8]."""
    return torch.empty(rows, PLANES, columns // 8, device=device, dtype=torch.int32)


if triton is not None:
    ROW_PLANES = tl.constexpr(PLANES)  # PLANES as kernels may read it

    @triton.jit
    def pairs_row(pairs_ptr, row, row_words):
        """Where row `row` of x pairs of `row_words` words a row starts."""
        return pairs_ptr + row * ROW_PLANES * row_words

    # Two float32 to float16 in one register, for any GPU from sm_53 (cvt.rn.f16x2.f32 needs sm_80; for sm_90
    # ptxas makes both the same single F2FP).
    F16_PAIR_PTX: tl.constexpr = tl.constexpr(
        "{ .reg .f16 lo, hi; cvt.rn.f16.f32 lo, $1; cvt.rn.f16.f32 hi, $2; mov.b32 $0, {lo, hi}; }")

    @triton.jit
    def f16_pair(low, high, PTX: tl.constexpr):
        """float32 low and high as one int32 holding two float16 (low in bits 0-15), rounded to nearest.
        PTX: in inline PTX (a GPU); otherwise by Triton ops (the interpreter runs no PTX)."""
        if PTX:
            return tl.inline_asm_elementwise(F16_PAIR_PTX, "=r,f,f", [low, high], dtype=tl.int32, is_pure=True,
                                             pack=1)
        low_bits = low.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return low_bits | (high.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) << 16)

    @triton.jit
    def pairs_of(xv, CHAIN: tl.constexpr, PTX: tl.constexpr):
        """x's columns (float32) as words of 8, [..., 2, 2, 2] (column 8c + i at [c, i // 4, i // 2 % 2,
        i % 2]) -> the four float16 pair tensors [...] for chains of CHAIN words, and each word's sum."""
        x_even, x_odd = tl.split(xv)  # by bit 0 of i, then bit 1, bit 2
        x04, x26 = tl.split(x_even)
        x15, x37 = tl.split(x_odd)
        x0, x4 = tl.split(x04)
        x2, x6 = tl.split(x26)
        x1, x5 = tl.split(x15)
        x3, x7 = tl.split(x37)
        x_sum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        low: tl.constexpr = 1.0 / (16 * CHAIN)  # exact: CHAIN is a power of two
        high: tl.constexpr = low / 16
        xa = f16_pair(x0 * low, x4 * low, PTX)
        xb = f16_pair(x1 * high, x5 * high, PTX)
        xc = f16_pair(x2 * low, x6 * low, PTX)
        xd = f16_pair(x3 * high, x7 * high, PTX)
        return xa, xb, xc, xd, x_sum

    @triton.jit
    def store_pairs(row_ptr, first_word, row_words, values, WORDS: tl.constexpr, CHAIN: tl.constexpr,
                    PTX: tl.constexpr):
        """`values` (float32 [WORDS * 8], as the gemv would load them) written as the x pairs of words
        first_word + [0, WORDS) of a row of `row_words` words at `row_ptr` (int32); words past the row
        are not written."""
        xa, xb, xc, xd, x_sum = pairs_of(tl.reshape(values, (WORDS, 2, 2, 2)), CHAIN, PTX)
        words = first_word + tl.arange(0, WORDS)
        inside = words < row_words
        tl.store(row_ptr + words, xa, mask=inside)
        tl.store(row_ptr + row_words + words, xb, mask=inside)
        tl.store(row_ptr + 2 * row_words + words, xc, mask=inside)
        tl.store(row_ptr + 3 * row_words + words, xd, mask=inside)
        tl.store(row_ptr + 4 * row_words + words, x_sum.to(tl.int32, bitcast=True), mask=inside)

    @triton.jit
    def load_pairs(x_row, k0, K, GROUPS: tl.constexpr, WPG: tl.constexpr, EVEN: tl.constexpr):
        """The pairs and sums of columns k0 + [0, GROUPS * WPG * 8) of a row of K columns stored as x
        pairs, each [GROUPS, WPG] (word c of the tile at [c // WPG, c % WPG]). EVEN: the tile lies inside
        the row."""
        KW = K // 8
        words = k0 // 8 + tl.arange(0, GROUPS)[:, None] * WPG + tl.arange(0, WPG)[None, :]
        if EVEN:
            xa = tl.load(x_row + words)
            xb = tl.load(x_row + KW + words)
            xc = tl.load(x_row + 2 * KW + words)
            xd = tl.load(x_row + 3 * KW + words)
            x_sum = tl.load(x_row + 4 * KW + words)
        else:
            inside = words < KW
            xa = tl.load(x_row + words, mask=inside, other=0)
            xb = tl.load(x_row + KW + words, mask=inside, other=0)
            xc = tl.load(x_row + 2 * KW + words, mask=inside, other=0)
            xd = tl.load(x_row + 3 * KW + words, mask=inside, other=0)
            x_sum = tl.load(x_row + 4 * KW + words, mask=inside, other=0)
        return xa, xb, xc, xd, x_sum.to(tl.float32, bitcast=True)
