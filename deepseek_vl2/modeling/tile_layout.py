"""The image tile layout: how one image's projected tiles become its sequence of embeddings.

Per image: the global view's grid rows each closed by `image_newline`, `view_seperator`, then the
local tiles stitched into one grid whose rows are each closed by `image_newline` (with
global_view_pos "tail", the local grid first and the global view last).
"""
import math
from typing import List

import torch


def real_crops(row) -> List[tuple]:
    """(width tiles, height tiles) of each image of a batch row, up to the first padding entry."""
    crops = []
    for w, h in row:
        if w == 0 or h == 0:
            break
        crops.append((int(w), int(h)))
    return crops


def image_sequence(projected: torch.Tensor, crops: List[tuple], image_newline: torch.Tensor,
                   view_seperator: torch.Tensor, global_view_pos: str = "head") -> torch.Tensor:
    """projected [tiles, side*side, width] (each image's global tile, then its w*h local tiles) ->
    [vectors, width] for the images with `crops` in order."""
    side = math.isqrt(projected.shape[1])
    width = projected.shape[2]
    pieces, tile = [], 0
    for w, h in crops:
        global_view = close_rows(projected[tile].view(side, side, width), image_newline)
        local = projected[tile + 1 : tile + 1 + w * h].view(h, w, side, side, width)
        local = close_rows(local.permute(0, 2, 1, 3, 4).reshape(h * side, w * side, width), image_newline)
        separator = view_seperator[None].to(device=projected.device, dtype=projected.dtype)
        if global_view_pos == "head":
            pieces += [global_view, separator, local]
        else:
            pieces += [local, separator, global_view]
        tile += 1 + w * h
    return torch.cat(pieces)


def close_rows(grid: torch.Tensor, image_newline: torch.Tensor) -> torch.Tensor:
    """grid [rows, cols, width] -> [rows * (cols + 1), width], each row followed by `image_newline`."""
    rows = grid.shape[0]
    newline = image_newline.to(device=grid.device, dtype=grid.dtype).view(1, 1, -1).expand(rows, 1, -1)
    return torch.cat((grid, newline), dim=1).reshape(-1, grid.shape[-1])
