"""What one continuous-engine iteration costs on the GPU, piece by piece, at the release's shapes:
the numbers behind the server's inter-token latency.

    python benchmarks/step_costs.py --variants tiny small --json $OUT/step_costs.json

For each variant (random bf16 weights, as bench.py builds them) and the serve_bench request (a
1024x1024 image and a question: 10 tiles, 2054 prompt tokens):

  step          a decode step's CUDA graph (engine/decode_steps.py) at R rows attending over the
                cache length a row of that prompt reaches (2304), replayed; rows of random tokens,
                so that they route over the experts as served tokens do (zeros would all pick the
                same few)
  tower block   one SigLIP block over the 10 tiles (vision.TowerPieces.advance(1)), each of the 27
  tower         the whole tower (advance(27)), then the projector and the layout (place_images)
  prefill       the decoder over the 2054 prompt embeddings at once
  layer         one decoder layer over them (layer_pieces.LayerPieces.advance(1)), each layer
  graph layer   the same from the engine's prompt graphs (prompt_graphs.GraphLayerPieces), the
                prompt padded to its bucket

A piece of a prompt (`--vision-blocks` tower blocks, or a few decoder layers) run before a step
delays every running row's next token by its own time; the serving target compares the
inter-token p99 with 3x the batch-1 plain step. Medians of repeats, with CUDA events.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench import build_model, make_prompt, timed  # noqa: E402
from deepseek_vl2.engine.decode_steps import DecodeSteps  # noqa: E402
from deepseek_vl2.engine.prompt_graphs import GraphLayerPieces, PromptGraphs  # noqa: E402
from deepseek_vl2.engine.slots import SlotCache, kv_bucket  # noqa: E402
from deepseek_vl2.modeling.kv_cache import KVCache  # noqa: E402
from deepseek_vl2.modeling.layer_pieces import LayerPieces  # noqa: E402
from deepseek_vl2.modeling.vision import TowerPieces  # noqa: E402
from deepseek_vl2.models import DeepseekVLV2Processor  # noqa: E402
from deepseek_vl2.offline_checkpoint import make_offline_checkpoint  # noqa: E402

NEW_TOKENS = 128


def replay_ms(graph: torch.cuda.CUDAGraph, repeats: int = 20) -> float:
    """Median milliseconds of one replay of `graph`."""
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def event_ms(fn) -> float:
    """Milliseconds of the GPU work `fn()` launches (CUDA events around it)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def profile_step(lm, rows: int, kv_len: int) -> None:
    """Print the GPU kernels of a decode step at `rows` rows (eager steps: the kernels a graph
    replays)."""
    from torch.profiler import ProfilerActivity, profile

    steps = DecodeSteps(lm, SlotCache(lm, rows, lm.config.max_position_embeddings), use_graphs=False)
    with torch.inference_mode():
        for _ in range(2):
            steps._step(rows, kv_len)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                steps._step(rows, kv_len)
            torch.cuda.synchronize()
    print(f"  kernels of 3 steps at {rows} rows:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))


def step_costs(lm, rows: list, kv_len: int) -> dict:
    """{"R": ms}: the decode step at R rows, on rows of random tokens near the end of the cache
    length (each row routes to its own experts, as served rows do)."""
    slots = SlotCache(lm, max(rows), lm.config.max_position_embeddings)
    steps = DecodeSteps(lm, slots, use_graphs=True)
    keys = [(steps.rows_for(r), kv_len) for r in rows]
    steps.capture(keys)
    g = torch.Generator(device="cuda").manual_seed(0)
    costs = {}
    for r, key in zip(rows, keys):
        tokens = torch.randint(0, lm.config.vocab_size, (key[0],), generator=g, device="cuda")
        steps.load(tokens, [kv_len - NEW_TOKENS] * key[0], [True] * key[0])
        costs[str(r)] = replay_ms(steps.graphs[key])
    print("  step: " + ", ".join(f"{r} rows {ms:.2f} ms" for r, ms in costs.items()), flush=True)
    del steps, slots
    torch.cuda.empty_cache()
    return costs


@torch.inference_mode()
def tower_costs(model, batch) -> dict:
    """Per-block and whole-tower milliseconds over the request's tiles, and the projector + layout."""
    prompt = model.image_prompt(batch.input_ids, batch.images.to(model.dtype), batch.images_seq_mask,
                                batch.images_spatial_crop)
    blocks = len(model.vision.blocks)
    per_block = []
    for _ in range(3):
        tower = TowerPieces(model.vision, prompt.tiles)
        per_block.append([event_ms(lambda: tower.advance(1)) for _ in range(blocks)])
    block_ms = [statistics.median(times) for times in zip(*per_block)]
    whole = []
    for _ in range(5):
        tower = TowerPieces(model.vision, prompt.tiles)
        whole.append(event_ms(lambda: tower.advance(blocks)))
    features = tower.advance(blocks)
    place = statistics.median(event_ms(lambda: model.place_images(prompt, features)) for _ in range(5))
    return dict(tiles=int(prompt.tiles.shape[0]), blocks=blocks, block_ms=block_ms, tower_ms=statistics.median(whole),
                place_images_ms=place, embeds=model.place_images(prompt, features))


@torch.inference_mode()
def prefill_ms(lm, embeds) -> float:
    def run():
        cache = KVCache(lm.config, 1, embeds.shape[1], "cuda", lm.dtype)
        lm(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return 1e3 * timed(run, repeats=5)


def per_layer_ms(start, layers: int) -> list:
    """Milliseconds of each of `layers` pieces of one layer (`start()`: a prompt's fresh pieces),
    medians of 5 passes after a warm-up pass."""
    passes = []
    for _ in range(6):
        pieces = start()
        passes.append([event_ms(lambda: pieces.advance(1)) for _ in range(layers)])
    return [statistics.median(times) for times in zip(*passes[1:])]


@torch.inference_mode()
def layer_ms(lm, embeds) -> list:
    """Milliseconds of each decoder layer over the whole prompt, run eagerly (LayerPieces)."""
    def start():
        return LayerPieces(lm, embeds, KVCache(lm.config, 1, embeds.shape[1], "cuda", lm.dtype), embeds.shape[1])
    return per_layer_ms(start, len(lm.model.layers))


@torch.inference_mode()
def graph_layer_ms(lm, embeds, kv_len: int) -> list:
    """Milliseconds of each decoder layer's prompt graph over the prompt."""
    graphs = PromptGraphs(lm, SlotCache(lm, 1, kv_len).prompt)
    print("  " + graphs.capture_all(), flush=True)
    return per_layer_ms(lambda: GraphLayerPieces(graphs, embeds), len(lm.model.layers))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "base"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8, 16, 32])
    parser.add_argument("--profile", action="store_true", help="also print the kernels of a step at 8 rows")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    header = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, date=time.strftime("%Y-%m-%d"),
                  command=" ".join(sys.argv))
    print(f"# {header['gpu']}, torch {header['torch']}, {header['date']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        processor = DeepseekVLV2Processor.from_pretrained(str(make_offline_checkpoint(Path(tmp) / "ckpt")))
    conversation, images = make_prompt(processor)
    results = []
    for variant in args.variants:
        model = build_model(variant)
        batch = processor(conversations=conversation, images=images, force_batchify=True).to("cuda")
        prompt_len = batch.input_ids.shape[1]
        kv_len = kv_bucket(prompt_len + NEW_TOKENS, model.language.config.max_position_embeddings)
        print(f"{variant}: prompt {prompt_len} tokens, steps over {kv_len} cache slots", flush=True)
        tower = tower_costs(model, batch)
        embeds = tower.pop("embeds")
        result = dict(variant=variant, prompt_tokens=prompt_len, kv_len=kv_len, **tower,
                      prefill_ms=prefill_ms(model.language, embeds), layer_ms=layer_ms(model.language, embeds),
                      graph_layer_ms=graph_layer_ms(model.language, embeds, kv_len),
                      step_ms=step_costs(model.language, args.rows, kv_len))
        print(f"  tower {result['tower_ms']:.2f} ms over {result['tiles']} tiles (block median "
              f"{statistics.median(result['block_ms']):.3f} ms), place_images {result['place_images_ms']:.2f} ms, "
              f"prefill {result['prefill_ms']:.2f} ms (layers {', '.join(f'{t:.2f}' for t in result['layer_ms'])} ms)",
              flush=True)
        print(f"  prompt graphs: {sum(result['graph_layer_ms']):.2f} ms (layers "
              f"{', '.join(f'{t:.2f}' for t in result['graph_layer_ms'])} ms)", flush=True)
        if args.profile:
            profile_step(model.language, 8, kv_len)
        results.append(result)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(header, results=results), indent=2))
        del model, embeds
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
