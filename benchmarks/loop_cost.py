"""CPU time the server's event loop spends per streamed chunk, on the CPU with the tiny fixture
checkpoint (no GPU needed).

The server runs in this process (uvicorn on its own asyncio loop, the continuous engine on its
thread); client processes each stream one answer at once. The loop thread's CPU time
(`time.thread_time`) is taken over a run of short answers and a run of long ones; the difference
divided by the difference in streamed chunks is what one more chunk costs the loop (the requests'
own handling cancels out). Median over repeats. Compare trees by running each tree's copy of this
script in the same session (the numbers depend on the machine and on what else runs there):

    python benchmarks/loop_cost.py [--clients 8] [--tokens 16 128] [--repeats 3] [--http h11]
"""
import argparse
import asyncio
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serve_bench import one_request, request_body  # noqa: E402

CHECKPOINT = REPO / "tests" / "fixtures" / "ckpt_tiny_mha"
IMAGE = REPO / "tests" / "fixtures" / "images" / "p09_384x384.png"


def body(tokens: int) -> bytes:
    import base64
    import json

    url = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
    request = json.loads(request_body(url))
    request["max_tokens"] = tokens
    return json.dumps(request).encode()


def client(job) -> int:
    """One streamed request (sent after a stagger); its streamed chunk count."""
    port, tokens, delay = job
    time.sleep(delay)
    return one_request(port, body(tokens))["chunks"]


async def serve_and_measure(args) -> list:
    import uvicorn

    from deepseek_vl2.engine import ChatEngine
    from deepseek_vl2.serve.app import create_app
    from deepseek_vl2.serve.settings import ServerSettings

    chat = ChatEngine.load(str(CHECKPOINT), device="cpu")
    app = create_app(chat, ServerSettings(model_id="tiny", max_num_seqs=args.clients, max_batch_size=args.clients))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning",
                                           http=args.http))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    rows = []
    with multiprocessing.get_context("spawn").Pool(args.clients) as pool:
        await loop.run_in_executor(None, pool.map, client, [(args.port, 4, 0.0)] * args.clients)  # warm-up
        for repeat in range(args.repeats):
            run = {}
            for tokens in args.tokens:
                jobs = [(args.port, tokens, 0.05 * i) for i in range(args.clients)]
                started = time.thread_time()  # this is the loop's thread
                chunks = sum(await loop.run_in_executor(None, pool.map, client, jobs))
                run[tokens] = (time.thread_time() - started, chunks)
            (short_cpu, short_chunks), (long_cpu, long_chunks) = run[min(run)], run[max(run)]
            per_chunk = (long_cpu - short_cpu) / max(long_chunks - short_chunks, 1)
            rows.append(per_chunk)
            print(f"repeat {repeat}: " + ", ".join(f"{t} tokens: {cpu * 1e3:.0f} ms loop CPU, {c} chunks"
                                                  for t, (cpu, c) in run.items())
                  + f" -> {per_chunk * 1e6:.0f} us per chunk", flush=True)
    server.should_exit = True
    await serving
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, nargs=2, default=[16, 128], help="max_tokens of the two runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--http", default="h11", help="uvicorn's HTTP implementation (h11 or httptools)")
    parser.add_argument("--port", type=int, default=8777)
    args = parser.parse_args()
    rows = asyncio.run(serve_and_measure(args))
    print(f"event-loop CPU per streamed chunk: median {statistics.median(rows) * 1e6:.0f} us "
          f"({', '.join(f'{r * 1e6:.0f}' for r in rows)}), {args.clients} clients, {REPO}")


if __name__ == "__main__":
    main()
