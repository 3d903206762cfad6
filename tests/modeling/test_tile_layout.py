"""The image tile layout against a hand-built sequence: global rows + newline, separator, the local
tiles stitched row by row + newline (and the "tail" order)."""
import torch

from deepseek_vl2.modeling.tile_layout import close_rows, image_sequence, real_crops


def test_real_crops_stop_at_padding():
    assert real_crops([[2, 1], [1, 1], [0, 0], [3, 3]]) == [(2, 1), (1, 1)]


def test_close_rows_appends_a_newline_per_row():
    grid = torch.arange(4.0).view(2, 2, 1)
    assert close_rows(grid, torch.tensor([9.0])).flatten().tolist() == [0, 1, 9, 2, 3, 9]


def test_one_image_of_two_local_tiles_side_by_side():
    side = 2
    tiles = torch.stack([torch.full((side * side, 1), float(t)) for t in range(3)])  # global, left, right
    tiles[1, :, 0] = torch.tensor([10.0, 11.0, 12.0, 13.0])  # left tile rows (10 11) (12 13)
    tiles[2, :, 0] = torch.tensor([20.0, 21.0, 22.0, 23.0])
    newline, separator = torch.tensor([-1.0]), torch.tensor([-2.0])
    out = image_sequence(tiles, [(2, 1)], newline, separator).flatten().tolist()
    global_rows = [0, 0, -1, 0, 0, -1]
    local_rows = [10, 11, 20, 21, -1, 12, 13, 22, 23, -1]
    assert out == global_rows + [-2] + local_rows
    tail = image_sequence(tiles, [(2, 1)], newline, separator, "tail").flatten().tolist()
    assert tail == local_rows + [-2] + global_rows
