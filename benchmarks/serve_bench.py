"""Benchmark the HTTP server under load on one CUDA GPU (two with --prefill-device), with a model of
the release's shapes.

    python benchmarks/serve_bench.py --variant tiny --schedulers static continuous --json serve.json

For each scheduler a server process is started (`--serve`: random bf16 weights at the release's
shapes built on the GPU, as bench.py builds them, the decoder's quantized with --quantization int8 /
int4, and the offline tokenizer; LM-head rows of ids the tokenizer lacks, of EOS, and of ids whose
text alone is an incomplete UTF-8 sequence are zeroed, so every answer runs its full length and
every token streams as a chunk of its own) and driven over HTTP with streamed requests, each a
1024x1024 image, a question and max_tokens=128, greedy:

  closed loop   N clients (1, 8, 32, 64), each sending its next request when its answer is in
  open loop     Poisson arrivals at fractions of the server's own 32-client closed-loop request rate

Each request is sent from a process of a pool of client processes (started and warmed up before the
first scenario), as independent users would send it: client threads sharing one interpreter would
wait for each other's turn at the GIL between receiving an event and timing it, and that wait would
be counted as the server's. Reported per scenario: output tok/s (completion tokens / wall time),
TTFT p50/p99 (request sent to the first streamed text), inter-token latency p50/p99 (gaps between
streamed chunks; one chunk per token here, `tokens_per_chunk` checks it), request latency p50/p99;
and from /health after the run:
decode graphs captured, decode steps that found no graph and torch.compile graphs compiled since
start-up (the engine's "nothing compiled or captured after start-up", counted).
"""
import argparse
import concurrent.futures
import contextlib
import gc
import http.client
import json
import multiprocessing
import random
import subprocess
import sys
import threading
import time
from collections import deque
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OPEN_LOOP_CLIENTS = 64  # client processes for the open loops: more than ever wait for answers at once
QUESTION = "Describe everything you can see in this picture: the objects, their colours and the whole scene."
NEW_TOKENS = 128


# ---- the server process -------------------------------------------------------------------------

def build_bench_model(variant: str, quantization: str, processor):
    """A random-weight model of the release's shapes (its decoder quantized with `quantization` int8 /
    int4) that answers `processor`'s tokenizer with whole-text ids only."""
    import torch

    from bench import build_model

    model = build_model(variant, quantization=quantization)
    with torch.no_grad():  # only ids with whole text of their own can win: full-length answers, a chunk per token
        head = model.language.lm_head.weight
        head[len(processor.tokenizer):] = 0
        head[processor.eos_id] = 0
        head[byte_fragment_ids(processor.tokenizer)] = 0
    return model


def build_chat_engine(variant: str, quantization: str = "none"):
    """A ChatEngine on the benchmark model, with the offline processor."""
    from bench import offline_processor
    from deepseek_vl2.engine import ChatEngine

    processor = offline_processor()
    return ChatEngine(build_bench_model(variant, quantization, processor), processor)


def build_continuous_engine(variant: str, quantization: str, slots: int, prefill):
    """The engine process's `build` (serve --engine-process): the benchmark model's continuous engine."""
    from bench import offline_processor
    from deepseek_vl2.engine.continuous import ContinuousEngine

    processor = offline_processor()
    return ContinuousEngine(build_bench_model(variant, quantization, processor), processor, max_num_seqs=slots,
                            prefill=prefill)


def byte_fragment_ids(tokenizer) -> list:
    """Ids whose text alone is an incomplete UTF-8 sequence (a byte-level BPE's non-ASCII bytes: 128
    of the offline tokenizer's 3008 ids). Random weights pick among the ids about evenly, so about one
    token in 24 could be such a byte; the server streams a byte with the token that completes its text,
    one chunk for two tokens, and the client would count a two-step gap. A model answering in English
    rarely emits a lone byte."""
    return [i for i in range(len(tokenizer)) if tokenizer.decode([i]).endswith("\ufffd")]


def prefill_settings(args):
    from deepseek_vl2.engine import PrefillSettings
    from deepseek_vl2.engine.prefill import parse_prefill_sms

    return PrefillSettings(chunk=args.prefill_chunk, vision_blocks=args.vision_blocks, layer_tokens=args.layer_tokens,
                           device=args.prefill_device, sms=parse_prefill_sms(args.prefill_sms))


def serve(variant: str, port: int, scheduler: str, slots: int, prefill, timeline: bool = False,
          quantization: str = "none", engine_process: bool = False) -> None:
    import uvicorn

    from deepseek_vl2.serve.app import create_app
    from deepseek_vl2.serve.settings import ServerSettings

    started = time.perf_counter()
    if timeline:
        from server_timeline import ServerTimeline

        timeline = ServerTimeline()
        timeline.install()
    if engine_process:  # the engine builds its model in a process of its own; this one prepares and streams
        import functools

        from bench import offline_processor
        from deepseek_vl2.serve.engine_process import EngineProcess

        chat = EngineProcess(functools.partial(build_continuous_engine, variant, quantization, slots, prefill),
                             offline_processor())
    else:
        chat = build_chat_engine(variant, quantization)
    settings = ServerSettings(model_id=variant, scheduler=scheduler, max_batch_size=slots, max_num_seqs=slots,
                              prefill=prefill,
                              max_concurrent_requests=4 * slots, request_timeout_s=1800)
    app = create_app(chat, settings)
    if timeline:
        timeline.add_route(app)
    print(f"server ready after {time.perf_counter() - started:.1f} s (build, start-up)", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ---- the clients ------------------------------------------------------------------------------------

def request_body(image_url: str) -> bytes:
    return json.dumps({
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                  {"type": "text", "text": QUESTION}]}],
        "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}}).encode()


def image_url() -> str:
    import base64

    from PIL import Image

    image = Image.radial_gradient("L").resize((1024, 1024)).convert("RGB")
    buffer = BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def one_request(port: int, body: bytes) -> dict:
    """Send one streamed request; its timings (seconds) and completion tokens."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1800)
    sent = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    chunks, tokens = [], None
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        if any(choice.get("delta", {}).get("content") for choice in event.get("choices", [])):
            chunks.append(time.perf_counter())
    connection.close()
    done = time.perf_counter()
    return dict(sent=sent, ttft=(chunks[0] - sent) if chunks else None, gaps=[b - a for a, b in zip(chunks, chunks[1:])],
                latency=done - sent, tokens=tokens or 0, chunks=len(chunks), done=done)


class ClientProcesses:
    """A pool of `size` client processes that send the benchmark's request to the server; `send()`
    sends one from an idle process and returns its timings. Started (and every process spawned) on
    entry."""

    def __init__(self, size: int, port: int, body: bytes):
        self.size, self.port, self.body = size, port, body

    def __enter__(self):
        self.pool = concurrent.futures.ProcessPoolExecutor(
            self.size, mp_context=multiprocessing.get_context("spawn"), initializer=_client_setup,
            initargs=(self.port, self.body))
        for future in [self.pool.submit(time.sleep, 0.5) for _ in range(self.size)]:
            future.result()  # an idle pool spawns a process per waiting task, up to its size
        return self

    def __exit__(self, *exc):
        self.pool.shutdown()

    def send(self) -> dict:
        return self.pool.submit(_client_request).result()


_CLIENT = {}


def _client_setup(port: int, body: bytes) -> None:
    _CLIENT.update(port=port, body=body)


def _client_request() -> dict:
    return one_request(_CLIENT["port"], _CLIENT["body"])


def closed_loop(send, clients: int, requests_each: int) -> list:
    """`clients` threads, each calling `send()` (one request, its timings) `requests_each` times."""
    results, lock = [], threading.Lock()

    def client():
        for _ in range(requests_each):
            result = send()
            with lock:
                results.append(result)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def requests_each(args, clients: int) -> int:
    """Requests per closed-loop client: --requests-per-client, more when the scenario needs --min-requests."""
    return max(args.requests_per_client, -(-args.min_requests // clients))


def open_loop(send, rate: float, count: int, seed: int = 0) -> list:
    """`count` requests (`send()`, one request, its timings) at Poisson arrivals of `rate` per second."""
    results, lock, threads = [], threading.Lock(), []
    arrivals = random.Random(seed)

    def client():
        result = send()
        with lock:
            results.append(result)

    for _ in range(count):
        thread = threading.Thread(target=client)
        thread.start()
        threads.append(thread)
        time.sleep(arrivals.expovariate(rate))
    for thread in threads:
        thread.join()
    return results


def open_rates(args, closed: dict) -> dict:
    """{scenario name: arrivals per second}: --open-rates as given, else --open-fractions of the
    32-client closed-loop request rate in `closed` (none without that scenario)."""
    if args.open_rates:
        return {f"open {rate:g} req/s": rate for rate in args.open_rates}
    closed32 = closed.get("closed 32")
    if closed32 is None:
        return {}
    base = closed32["tok_s"] / NEW_TOKENS
    return {f"open {f:g}x ({f * base:.1f} req/s)": f * base for f in args.open_fractions}


def pct(values, q):
    """The q-th percentile of `values` (the nearest rank), NaN for none."""
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def summary(results: list, server: dict = None) -> dict:
    """The scenario's figures from its requests' timings; `server`: the server's own timeline of it
    (server_timeline.py, with --timeline)."""
    start = min(r["sent"] for r in results)
    end = max(r["done"] for r in results)
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    gaps = [g for r in results for g in r["gaps"]]
    latencies = [r["latency"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    result = dict(requests=len(results), tokens=tokens, wall_s=end - start, tok_s=tokens / (end - start),
                  ttft_p50_ms=1e3 * pct(ttfts, 50), ttft_p99_ms=1e3 * pct(ttfts, 99),
                  itl_p50_ms=1e3 * pct(gaps, 50), itl_p99_ms=1e3 * pct(gaps, 99),
                  latency_p50_s=pct(latencies, 50), latency_p99_s=pct(latencies, 99),
                  mean_tokens=tokens / len(results), tokens_per_chunk=tokens / max(sum(r["chunks"] for r in results), 1))
    if all("token_gaps" in r for r in results):  # in-process: the gaps between tokens too, whatever their text
        token_gaps = [g for r in results for g in r["token_gaps"]]
        result.update(token_itl_p50_ms=1e3 * pct(token_gaps, 50), token_itl_p99_ms=1e3 * pct(token_gaps, 99))
    if server:
        result["server"] = server
    return result


def get_json(port: int, path: str = "/health") -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    connection.request("GET", path)
    body = json.loads(connection.getresponse().read())
    connection.close()
    return body


def run_scheduler(args, scheduler: str, port: int, body: bytes) -> dict:
    command = [sys.executable, __file__, "--serve", args.variant, "--port", str(port), "--scheduler", scheduler,
               "--slots", str(args.slots), "--prefill-chunk", str(args.prefill_chunk),
               "--vision-blocks", str(args.vision_blocks), "--layer-tokens", str(args.layer_tokens)]
    for flag in ("piecewise_rows", "whole_prefill_queue", "switch_interval", "prefill_device", "prefill_sms", "quantization",
                 "quant_gemv_rows"):
        if getattr(args, flag) is not None:
            value = getattr(args, flag)
            command += ["--" + flag.replace("_", "-"), *map(str, value if isinstance(value, list) else [value])]
    command += ["--timeline"] if args.timeline else []
    command += ["--engine-process"] if args.engine_process else []
    command += ["--gc-off"] if args.gc_off else []
    server = subprocess.Popen(command, stdout=sys.stdout, stderr=sys.stderr)
    try:
        deadline = time.monotonic() + args.startup_timeout
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the {scheduler} server exited with {server.returncode}")
            try:
                get_json(port)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the {scheduler} server did not start in {args.startup_timeout} s") from None
                time.sleep(1)
        one_request(port, body)  # the first request's one-time costs are not what this measures
        timeline = (lambda: get_json(port, "/bench/timeline")) if args.timeline else dict
        timeline()  # starts over (and starts the loop's lag monitor)
        scenarios = {}
        with ClientProcesses(max(args.clients + [OPEN_LOOP_CLIENTS]), port, body) as clients_pool:
            for clients in args.clients:
                scenarios[f"closed {clients}"] = summary(
                    closed_loop(clients_pool.send, clients, requests_each(args, clients)), timeline())
                print(scheduler, f"closed {clients}", json.dumps(scenarios[f"closed {clients}"]), flush=True)
            for name, rate in open_rates(args, scenarios).items():
                count = max(8, int(rate * args.open_seconds))
                scenarios[name] = dict(summary(open_loop(clients_pool.send, rate, count), timeline()), rate=rate)
                print(scheduler, name, json.dumps(scenarios[name]), flush=True)
        health = get_json(port)
        return dict(scheduler=scheduler, scenarios=scenarios, health=health)
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


@contextlib.contextmanager
def engine_rule(args):
    """Within the block: --piecewise-rows / --whole-prefill-queue: the continuous engine's rule for
    prefilling whole (continuous.py's constants), --switch-interval: the interpreter's thread switch
    interval, --gc-off: no cyclic garbage collection, and --quant-gemv-rows: dispatch's gemv row
    limits for quantized weights, for trying other values in this process."""
    from deepseek_vl2.engine import continuous
    from deepseek_vl2.kernels import dispatch

    if args.piecewise_rows is not None:
        continuous.PIECEWISE_ROWS = args.piecewise_rows
    if args.whole_prefill_queue is not None:
        continuous.WHOLE_PREFILL_QUEUE = args.whole_prefill_queue
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    if args.gc_off:
        gc.disable()
    with dispatch.quant_gemv_rows(*args.quant_gemv_rows) if args.quant_gemv_rows else contextlib.nullcontext():
        yield


class IterationLog:
    """Wraps `engine.step`: each iteration's end time, what it launched, how many rows decode, the
    host time the call took, and which one-off parts of a prefill ran in it (`MARKS`: the prompt's
    tiles sent to the tower, the tower's features placed in the prompt, the first decoder-layer
    piece, the prompt's end with its first token, a request admitted, a row joining; with a prefill
    thread beside the steps, a prompt launched in either lane, from that thread). Iteration i
    launches its work and then waits for iteration i-1's, so on a busy GPU the time from the end of
    iteration i to the end of i+1 is what iteration i's work took on the device. How long iteration
    i+1 waited there for the device (the copy of iteration i's tokens) tells which it was: next to
    nothing, and the device had finished before the engine's thread came to wait (the host was late:
    its own work, or the interpreter lock); more, and the device's work set the time. (An iteration
    with no tokens to take waits for nothing; with rows decoding, every iteration has some.)
    `Chosen.values` is wrapped for the whole process (its instances are made per step)."""

    KINDS = ("whole prefill", "tower piece", "layer piece", "plain step")
    # an iteration that starts while the prefill thread has a prompt in flight is also marked "beside a prompt"
    # with the prompt's lane (from `_lane` choosing it until `_hand_over` has waited for its work on the device)
    SLOW_MS = 2.7  # iterations slower than this are counted by label (tiny's inter-token target is ~3x 0.9 ms)
    LATE_HOST_MS = 0.05  # a slow iteration whose successor waited less than this for the device: the host was late

    def __init__(self, engine):
        self.engine, self.entries, self.marks = engine, [], set()
        step = engine.step
        engine.step = lambda: self._timed(step)
        self._waited = 0.0  # seconds the current iteration waited for chosen tokens' copies (Chosen.values)
        from deepseek_vl2.engine import row_sampling

        values = row_sampling.Chosen.values

        def timed_values(chosen):
            started = time.perf_counter()
            try:
                return values(chosen)
            finally:
                self._waited += time.perf_counter() - started

        row_sampling.Chosen.values = timed_values
        from deepseek_vl2.engine.prefill import Prefill

        prefill = engine.prefill
        if isinstance(prefill, Prefill):  # pieces between the steps (prefill.py)
            self._mark(engine.model, "image_prompt", "tiles in")
            self._mark(engine.model, "place_images", "features placed")
            self._mark(prefill, "_end", "prompt end")
            self._mark(prefill, "_layers", lambda request: "layers start" if request.layers is None else None)
        self._in_flight, self._lanes = deque(), {}  # beside the steps: lanes of prompts not handed over, their marks
        if getattr(prefill, "beside", False):  # a prefill thread beside the steps: which lane a prompt was launched in
            self._mark(prefill, "_layers", lambda embeds, graphs: "prompt on the whole GPU"
                       if graphs is prefill.whole_gpu.graphs else "prompt on the SMs set aside")
            lane, hand_over = prefill._lane, prefill._hand_over

            def chosen_lane():  # each prompt's lane is chosen once, and each prompt is handed over once, in order
                self._in_flight.append(lane())
                return self._in_flight[-1]

            def handed_over(done):  # in flight until its work on the device has ended (hand_over waits for it)
                try:
                    return hand_over(done)
                finally:
                    self._in_flight.popleft()

            prefill._lane, prefill._hand_over = chosen_lane, handed_over
            self._lanes = {id(prefill.whole_gpu): "beside a prompt on the whole GPU",
                           id(prefill.set_aside): "beside a prompt on the SMs set aside"}
        self._mark(engine, "admit_request", "admit")
        self.collections, self._collecting = [], None  # (generation, ms) of each garbage collection
        gc.callbacks.append(self._collection)
        join = engine._join_prefilled
        engine._join_prefilled = lambda: (lambda joined: (self.marks.add("join") if joined else None, joined)[1])(join())

    def _collection(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._collecting = time.perf_counter()
        elif self._collecting is not None:
            self.collections.append((info["generation"], 1e3 * (time.perf_counter() - self._collecting)))

    def _mark(self, owner, name: str, label) -> None:
        """Wrap `owner.name` to mark the iteration it runs in with `label`: a string, or a function of
        the call's arguments that gives one (None: no mark)."""
        if not hasattr(owner, name):
            return
        function = getattr(owner, name)

        def marked(*args, **kwargs):
            text = label(*args, **kwargs) if callable(label) else label
            if text is not None:
                self.marks.add(text)
            return function(*args, **kwargs)
        setattr(owner, name, marked)

    def _timed(self, step) -> None:
        stats = self.engine.stats
        before = (stats.whole_prefills, stats.tower_pieces, stats.layer_pieces, stats.decode_steps)
        self.marks = {self._lanes[id(lane)] for lane in list(self._in_flight)}
        self._waited = 0.0
        started = time.perf_counter()
        step()
        ended = time.perf_counter()
        after = (stats.whole_prefills, stats.tower_pieces, stats.layer_pieces, stats.decode_steps)
        kind = next((k for k, b, a in zip(self.KINDS, before, after) if a > b), None)
        label = kind if kind is None or not self.marks else f"{kind} + {', '.join(sorted(self.marks))}"
        self.entries.append((ended, label, len(self.engine._running), ended - started, self._waited))

    def summary(self) -> dict:
        """{label: count, p50 and p99 ms of the work it launched, host ms of the call p50 / p99, mean
        rows decoding, how many took longer than SLOW_MS, and of those how many the host was late for
        (the next iteration waited under LATE_HOST_MS for the device)}."""
        durations = {}
        for (end, label, rows, host, _), (next_end, _, _, _, next_wait) in zip(self.entries, self.entries[1:]):
            if label is not None:
                durations.setdefault(label, []).append((1e3 * (next_end - end), rows, 1e3 * host, 1e3 * next_wait))
        result = {}
        for label, values in sorted(durations.items()):
            ms, host = [v for v, _, _, _ in values], [h for _, _, h, _ in values]
            result[label] = dict(count=len(ms), p50_ms=round(pct(ms, 50), 3), p99_ms=round(pct(ms, 99), 3),
                                 host_p50_ms=round(pct(host, 50), 3), host_p99_ms=round(pct(host, 99), 3),
                                 mean_rows=round(sum(r for _, r, _, _ in values) / len(values), 2),
                                 slow=sum(v > self.SLOW_MS for v in ms),
                                 slow_host_late=sum(v > self.SLOW_MS and w < self.LATE_HOST_MS for v, _, _, w in values))
        for generation in range(3):
            ms = [t for g, t in self.collections if g == generation]
            if ms:
                result[f"garbage collections, generation {generation}"] = dict(
                    count=len(ms), p50_ms=round(pct(ms, 50), 3), max_ms=round(max(ms), 3),
                    over_half_ms=sum(t > 0.5 for t in ms))
        self.entries, self.collections = [], []
        return result


def in_process(args) -> None:
    """The continuous engine without HTTP: the same closed and open loops, clients submitting to the
    engine directly (what the server adds on top is the difference). Inter-token gaps are between text
    events, what the server streams as chunks, and also between tokens (`token_itl_*`). Each scenario also reports its
    iterations by kind (IterationLog); `--profile` prints where the engine's thread spends its time."""
    import cProfile
    import pstats

    from PIL import Image

    from deepseek_vl2.engine import GenerationParams
    from deepseek_vl2.engine.continuous import ContinuousEngine

    chat = build_chat_engine(args.variant, args.quantization)
    started = time.perf_counter()
    engine = ContinuousEngine(chat.model, chat.processor, max_num_seqs=args.slots, prefill=prefill_settings(args))
    print(f"engine ready in {time.perf_counter() - started:.1f} s: {engine.startup_summary}", flush=True)
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        step = engine.step
        engine.step = lambda: profiler.runcall(step)
    iterations = IterationLog(engine)
    engine.start()
    image = Image.radial_gradient("L").resize((1024, 1024)).convert("RGB")
    conversation = [{"role": "<|User|>", "content": "<image>\n" + QUESTION}, {"role": "<|Assistant|>", "content": ""}]
    params = GenerationParams(max_new_tokens=NEW_TOKENS, temperature=0)
    prepared = engine.prepare_one(conversation, [image])

    def request():
        sent = time.perf_counter()
        sample = engine.prepare_one(conversation, [image]) if args.prepare_at_arrival else prepared
        handle = engine.submit(sample, params)
        times, chunks, tokens = [], [], 0
        while True:
            kind, value = handle.events.get()
            if kind == "token":
                times.append(time.perf_counter())
            elif kind == "text":  # what the server streams as a chunk
                chunks.append(time.perf_counter())
            elif kind == "done":
                tokens = len(value.token_ids)
                break
            elif kind == "error":
                raise value
        done = time.perf_counter()
        return dict(sent=sent, ttft=chunks[0] - sent, gaps=[b - a for a, b in zip(chunks, chunks[1:])],
                    token_gaps=[b - a for a, b in zip(times, times[1:])], latency=done - sent, tokens=tokens,
                    chunks=len(chunks), done=done)

    request()
    iterations.summary()
    scenarios = {}
    for clients in args.clients:
        scenarios[f"closed {clients}"] = summary(closed_loop(request, clients, requests_each(args, clients)))
        scenarios[f"closed {clients}"]["iterations"] = iterations.summary()
        print("in-process", f"closed {clients}", json.dumps(scenarios[f"closed {clients}"]), flush=True)
    for name, rate in open_rates(args, scenarios).items():
        scenarios[name] = dict(summary(open_loop(request, rate, max(8, int(rate * args.open_seconds)))), rate=rate,
                               iterations=iterations.summary())
        print("in-process", name, json.dumps(scenarios[name]), flush=True)
    engine.close()
    if args.json:
        Path(args.json).write_text(json.dumps(dict(variant=args.variant, command=" ".join(sys.argv),
                                                   scenarios=scenarios), indent=2))
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="tiny", choices=["tiny", "small", "base"])
    parser.add_argument("--schedulers", nargs="+", default=["static", "continuous"], choices=["static", "continuous"])
    parser.add_argument("--clients", nargs="*", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=4, help="per closed-loop scenario")
    parser.add_argument("--open-fractions", nargs="+", type=float, default=[0.25, 0.5, 0.75],
                        help="open-loop rates, as fractions of the 32-client closed-loop request rate")
    parser.add_argument("--open-rates", nargs="+", type=float,
                        help="open-loop rates in requests per second (instead of --open-fractions)")
    parser.add_argument("--open-seconds", type=float, default=10.0, help="arrivals span about this long")
    parser.add_argument("--slots", type=int, default=64, help="--max-num-seqs and --max-batch-size of the server")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="--prefill-chunk of the server")
    parser.add_argument("--vision-blocks", type=int, default=4, help="--vision-blocks of the server")
    parser.add_argument("--layer-tokens", type=int, default=4096, help="--layer-tokens of the server")
    parser.add_argument("--prefill-device", help="--prefill-device of the server (a second GPU, cuda:1)")
    parser.add_argument("--prefill-sms", default="auto",
                        help="--prefill-sms of the server (SMs set aside for prefill: auto, off or a number)")
    parser.add_argument("--quantization", default="none", choices=["none", "int8", "int4"],
                        help="the decoder's weights (bench.py's build_model)")
    parser.add_argument("--port", type=int, default=8931)
    parser.add_argument("--startup-timeout", type=float, default=600)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--in-process", action="store_true",
                        help="drive the continuous engine directly (no HTTP server), the same loops")
    parser.add_argument("--profile", action="store_true", help="with --in-process: profile the engine's thread")
    parser.add_argument("--prepare-at-arrival", action="store_true",
                        help="with --in-process: each request runs the processor when it arrives (as the server does)")
    parser.add_argument("--piecewise-rows", type=int, help="the engine's PIECEWISE_ROWS (continuous.py)")
    parser.add_argument("--whole-prefill-queue", type=int, help="the engine's WHOLE_PREFILL_QUEUE (continuous.py)")
    parser.add_argument("--switch-interval", type=float, help="the server's sys.setswitchinterval, seconds")
    parser.add_argument("--gc-off", action="store_true", help="the server runs without Python's cyclic garbage collector")
    parser.add_argument("--quant-gemv-rows", type=int, nargs=2, metavar=("EXPERTS", "PROJECTIONS"),
                        help="dispatch's QUANT_EXPERT_GEMV_ROWS (both widths) and QUANT_LINEAR_GEMV_ROWS: token "
                             "rows up to which a quantized model's decode reads those weights by gemv")
    parser.add_argument("--engine-process", action="store_true",
                        help="the server runs its continuous engine in a process of its own (--engine-process); "
                             "--piecewise-rows, --whole-prefill-queue and --quant-gemv-rows then do not reach it")
    parser.add_argument("--timeline", action="store_true",
                        help="the server also times each streamed piece inside (server_timeline.py)")
    parser.add_argument("--serve", choices=["tiny", "small", "base"], help=argparse.SUPPRESS)
    parser.add_argument("--scheduler", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.in_process:  # the server and its clients
        from deepseek_vl2.utils.extras import missing_extra

        problem = missing_extra("serve")
        if problem is not None:
            sys.exit(f"serve_bench.py starts the server, which needs the serve extra: {problem}")
    if args.serve:
        sys.path.insert(0, str(REPO / "benchmarks"))
        with engine_rule(args):
            serve(args.serve, args.port, args.scheduler, args.slots, prefill_settings(args), args.timeline,
                  args.quantization, args.engine_process)
        return
    if args.in_process:
        sys.path.insert(0, str(REPO / "benchmarks"))
        with engine_rule(args):
            in_process(args)
        return
    import torch

    header = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  variant=args.variant, command=" ".join(sys.argv))
    print(f"# {header['gpu']}, torch {header['torch']}, {header['date']}, {args.variant}", flush=True)
    body = request_body(image_url())
    runs = []
    for index, scheduler in enumerate(args.schedulers):
        runs.append(run_scheduler(args, scheduler, args.port + index, body))
        if args.json:
            Path(args.json).write_text(json.dumps(dict(header, runs=runs), indent=2))
    print("| scheduler | scenario | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | latency p50 / p99 s |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        for name, s in run["scenarios"].items():
            print(f"| {run['scheduler']} | {name} | {s['tok_s']:.0f} | {s['ttft_p50_ms']:.0f} / {s['ttft_p99_ms']:.0f} "
                  f"| {s['itl_p50_ms']:.1f} / {s['itl_p99_ms']:.1f} | {s['latency_p50_s']:.2f} / "
                  f"{s['latency_p99_s']:.2f} |")
        print(f"| {run['scheduler']} | /health after the run | {json.dumps(run['health']['scheduler'])} |")


if __name__ == "__main__":
    main()
