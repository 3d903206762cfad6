"""CUDA graphs of the vision tower over a prompt's image tiles, for the prefill thread
(prefill_thread.py).

Run eagerly, the tower is about five hundred operator calls from Python per prompt (SigLIP's 27
blocks): 7.4 ms of host time for 10 tiles on an H200's host, against 0.35 ms to replay a graph, spent
by the prefill thread in the interpreter it shares with the engine's thread and the server's event
loop. With the graphs, tiny's inter-token p99 over HTTP was lower in each of four same-call pairs
(benchmarks/RESULTS.md, twenty-second session). Here the tower over n tiles, for n from 1 to
`max_tiles` (the most tiles one image gives with the model's candidate resolutions: 10 for every
release), is one graph each, captured at start-up on the lane's stream (a graph keeps to the SMs of
the stream it was captured on). A prompt's tiles are copied into a static buffer and the replay
writes their features into another. Each tile goes through the tower on its own (attention stays
within a tile), so a prompt with more tiles runs in pieces of at most `max_tiles`, one replay each.
"""
import logging
import time
import weakref
from typing import Dict

import torch

from ..generation.cuda_graphs import capture_each
from ..modeling.vision import tower_features

logger = logging.getLogger(__name__)


def tiles_per_image(config) -> int:
    """The most tiles one image is cut into for a DeepseekVLV2Config: its global view and the local
    tiles of its largest candidate resolution."""
    size = config.vision_config.image_size
    return 1 + max((width // size) * (height // size) for width, height in config.candidate_resolutions)


class TowerGraphs:
    """One CUDA graph per tile count (1 to `max_tiles`) of `model`'s vision tower, a
    DeepseekVLV2ForCausalLM on CUDA."""

    def __init__(self, model, max_tiles: int):
        vision = model.vision
        weight = vision.patch_embed.proj.weight
        if weight.device.type != "cuda":
            raise ValueError(f"tower graphs need a vision tower on CUDA, not {weight.device}")
        self._vision = weakref.ref(vision)
        self.max_tiles = max_tiles
        self.tiles = torch.zeros(max_tiles, 3, *vision.patch_embed.img_size, dtype=weight.dtype, device=weight.device)
        tokens = vision.patch_embed.num_patches + vision.num_prefix_tokens
        self.features = torch.zeros(max_tiles, tokens, vision.embed_dim, dtype=weight.dtype, device=weight.device)
        self.graphs: Dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def _run(self, count: int) -> None:
        self.features[:count].copy_(tower_features(self._vision(), self.tiles[:count]))

    def capture_all(self, stream=None) -> str:
        """Capture a graph for every tile count, on `stream` (capture_each); what was done, for the
        start-up log."""
        started = time.perf_counter()
        keys = [(count,) for count in range(self.max_tiles, 0, -1)]  # the most tiles first (capture_each)
        captured = capture_each(keys, self._run, self.pool, self.tiles.device, stream)
        self.graphs.update({count: graph for (count,), graph in captured.items()})
        summary = (f"captured {len(self.graphs)} vision-tower graphs (1 to {self.max_tiles} tiles) in "
                   f"{time.perf_counter() - started:.1f} s")
        logger.info(summary)
        return summary

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        """tower_features(tower, tiles) from the graphs, on the current stream: [tiles, tokens, width].
        With at most `max_tiles` tiles a view of the static features, valid until the next call."""
        in_pieces = tiles.shape[0] > self.max_tiles  # then each piece is copied out: the next replay writes the buffer
        pieces = []
        for start in range(0, tiles.shape[0], self.max_tiles):
            count = min(self.max_tiles, tiles.shape[0] - start)
            self.tiles[:count].copy_(tiles[start : start + count])
            self.graphs[count].replay()
            pieces.append(self.features[:count].clone() if in_pieces else self.features[:count])
        return torch.cat(pieces) if in_pieces else pieces[0]
