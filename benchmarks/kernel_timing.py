"""GPU time of small kernels as they run inside a decode step's CUDA graph.

`triton.testing.do_bench` launches from Python each time, and for kernels of a few microseconds
the launch, not the GPU, is what it measures. Here `calls` calls are captured into one CUDA graph
and replayed; each call gets its own copy of the inputs (cycling over `copies`), so the weights
and caches come from HBM, not from L2, as they do in a decode step that reads every layer once.
"""
import statistics

import torch


def graph_us(make_call, copies: int, calls: int = 32, replays: int = 7) -> float:
    """Median microseconds per call; `make_call(i)` returns a thunk that launches call i's kernels
    on copy i of its inputs."""
    thunks = [make_call(i % copies) for i in range(calls)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (Triton compiles here)
        for thunk in thunks[:copies]:
            thunk()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for thunk in thunks:
            thunk()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def copies_for(nbytes: int, at_least: int = 160 * 2**20) -> int:
    """Input copies so that one cycle through them reads well past the 50 MB L2."""
    return max(1, -(-at_least // max(nbytes, 1)))
