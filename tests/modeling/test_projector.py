"""The projector's 2x2 window merge, whose element order parity depends on."""
import torch

from deepseek_vl2.modeling.projector import merge_windows


def test_merge_windows_is_channel_major_with_bottom_right_zero_padding():
    side, C = 3, 2
    grid = torch.arange(side * side * C, dtype=torch.float32).view(1, side * side, C)
    merged = merge_windows(grid, 2)  # 3x3 -> padded 4x4 -> 2x2 windows of 4 cells x 2 channels
    assert merged.shape == (1, 4, 8)
    cell = lambda r, c, ch: grid[0, r * side + c, ch].item() if r < side and c < side else 0.0  # noqa: E731
    for R in range(2):
        for Cc in range(2):
            expected = [cell(2 * R + dr, 2 * Cc + dc, ch) for ch in range(C) for dr in range(2) for dc in range(2)]
            assert merged[0, R * 2 + Cc].tolist() == expected
