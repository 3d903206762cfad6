"""How much a decode step slows while a prompt's large matrix products run beside it on the same GPU,
on a plain stream and on SMs set aside for them (a CUDA green context, devices.partition_stream).

    python benchmarks/green_context_probe.py [--sms 16 32 48 66 88]

The decode-like work is a CUDA graph of 12 bf16 products of one token row with 4096 x 3072 weights
(about 300 MB read, as a step of tiny reads), timed with CUDA events, 200 times 0.5 ms apart
(median and p99). Beside it, another thread runs 8192 x 8192 x 8192 bf16 products in a loop, four
per synchronisation; their rate says what the set-aside SMs leave of the GPU's throughput. Each
line is one placement of those products:

  plain stream       an ordinary CUDA stream (of lower priority than the decode's)
  green K            a stream of a green context of K SMs, the products launched eagerly
  graph, ...         the products as a CUDA graph, captured on an ordinary stream or on the green
                     context's, and replayed on the green context's stream or an ordinary one:
                     whether a graph keeps to the SMs of where it was captured or of where it runs
"""
import argparse
import statistics
import threading
import time

import torch

from deepseek_vl2.modeling.devices import partition_stream

DECODE_WEIGHTS = 12
SIDE = 8192


def decode_graph(device, stream):
    """(the decode-like graph, the tensors it reads: the caller keeps them alive while it replays it)."""
    weights = [torch.randn(4096, 3072, device=device, dtype=torch.bfloat16) for _ in range(DECODE_WEIGHTS)]
    x = torch.randn(1, 4096, device=device, dtype=torch.bfloat16)

    def step():
        y = x
        for w in weights:
            y = torch.nn.functional.pad(y @ w, (0, 4096 - w.shape[1]))
        return y

    with torch.cuda.stream(stream):
        step()
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
    return graph, (weights, x)


def time_decode(graph, stream, repeats: int = 200):
    """Median and p99 microseconds of the decode graph."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        with torch.cuda.stream(stream):
            graph.replay()
        end.record(stream)
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end))
        time.sleep(0.0005)
    times.sort()
    return statistics.median(times), times[int(0.99 * len(times))]


def products_graph(a, stream):
    with torch.cuda.stream(stream):
        for _ in range(2):
            a @ a
        torch.cuda.synchronize(a.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(4):
                a @ a
    return graph


def beside(label, work, stream, decode, decode_stream):
    """Time the decode graph while `work()` (four products) runs in a loop on `stream` in another thread."""
    stop, done = threading.Event(), [0]

    def loop():
        with torch.cuda.stream(stream):
            while not stop.is_set():
                work()
                stream.synchronize()
                done[0] += 4

    thread = threading.Thread(target=loop)
    thread.start()
    time.sleep(0.3)
    before, started = done[0], time.perf_counter()
    median, p99 = time_decode(decode, decode_stream)
    rate = (done[0] - before) / (time.perf_counter() - started)
    stop.set()
    thread.join()
    print(f"| {label} | {median:.0f} | {p99:.0f} | {rate:.0f} |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sms", nargs="+", type=int, default=[16, 32, 48, 66, 88])
    args = parser.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).multi_processor_count
    print(f"# {torch.cuda.get_device_name(device)} ({total} SMs), torch {torch.__version__}")
    decode_stream = torch.cuda.Stream(device, priority=-1)
    decode, decode_inputs = decode_graph(device, decode_stream)
    a = torch.randn(SIDE, SIDE, device=device, dtype=torch.bfloat16)

    def eager():
        for _ in range(4):
            a @ a

    print("| products beside the decode | decode median us | decode p99 us | products / s |")
    print("|---|---|---|---|")
    median, p99 = time_decode(decode, decode_stream)
    print(f"| none | {median:.0f} | {p99:.0f} | |")
    plain = torch.cuda.Stream(device, priority=0)
    beside("plain stream", eager, plain, decode, decode_stream)
    contexts = {}
    for sms in args.sms:
        contexts[sms] = partition_stream(device, sms)  # (stream, context): the context must stay alive
        beside(f"green {sms}", eager, contexts[sms][0], decode, decode_stream)
    sms = max(args.sms)
    green = contexts[sms][0]
    captured_plain = products_graph(a, plain)
    beside(f"graph captured on a plain stream, replayed on green {sms}", captured_plain.replay, green, decode,
           decode_stream)
    captured_green = products_graph(a, green)
    beside(f"graph captured on green {sms}, replayed there", captured_green.replay, green, decode, decode_stream)
    beside(f"graph captured on green {sms}, replayed on a plain stream", captured_green.replay, plain, decode,
           decode_stream)


if __name__ == "__main__":
    main()
