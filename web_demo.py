"""Chat with DeepSeek-VL2 about images in the browser (gradio >= 5: `pip install -e ".[gradio]"`).

    python web_demo.py --model_name DeepSeek-VL2-tiny
    python web_demo.py --model_path offline-ckpt --port 37913

Type a question, attach one or more images (paperclip, or drop them on the box), and the answer
streams in. Grounding answers (`<|ref|>the cat<|/ref|>`, `<|grounding|>...`) have their boxes drawn
on the conversation's last image, shown beside the chat. The demo answers through the server's
continuous-batching engine (browser sessions answering at the same time share the decode steps,
up to --max-num-seqs; a model spread over several GPUs answers through ChatEngine.chat_batch, one
answer at a time). It listens on 127.0.0.1 and never opens a public share link; pass --host 0.0.0.0
to reach it from other machines.
"""
import argparse
import html
import queue
import threading

try:
    import gradio as gr
except ImportError:
    raise SystemExit('web_demo.py needs gradio >= 5: pip install -e ".[gradio]"') from None

MODEL_IDS = {
    "DeepSeek-VL2-tiny": "deepseek-ai/deepseek-vl2-tiny",
    "DeepSeek-VL2-small": "deepseek-ai/deepseek-vl2-small",
    "DeepSeek-VL2": "deepseek-ai/deepseek-vl2",
}
TITLE = "DeepSeek-VL2 Chatbot"
HINT = ("Attach images and ask about them. Special tokens: `<image>` (where an image goes; added in front "
        "when missing), visual grounding: `<|ref|>{query}<|/ref|>`, grounded conversation: `<|grounding|>{question}`.")


def parse_args(argv=None) -> argparse.Namespace:
    from deepseek_vl2.engine import add_engine_arguments

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model_name", help=f"one of {', '.join(MODEL_IDS)} or a hub id")
    source.add_argument("--model_path", help="a local checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=37913)
    p.add_argument("--max-num-seqs", type=int, default=4, help="answers decoding at once")
    add_engine_arguments(p)
    return p.parse_args(argv)


class Demo:
    """The chat logic behind the page; `history` is the engine's conversation (image paths included)."""

    def __init__(self, engine, max_num_seqs: int = 4):
        self.engine = engine
        self.max_num_seqs = max_num_seqs
        self._continuous = None  # the continuous-batching engine on its own thread, made at the first answer
        self._lock = threading.Lock()  # guards making the engine; on a split model, each answer

    def continuous(self):
        """The running continuous-batching engine, or None for a model spread over several GPUs."""
        from deepseek_vl2.engine.continuous import ContinuousEngine

        with self._lock:
            if self._continuous is None and not self.engine.model.language.is_split:
                self._continuous = ContinuousEngine(self.engine.model, self.engine.processor,
                                                    max_num_seqs=self.max_num_seqs)
                self._continuous.start()
            return self._continuous

    def add_user_turn(self, message: dict, chat: list, history: list):
        text, files = (message or {}).get("text", "").strip(), (message or {}).get("files", [])
        if not text and not files:
            raise gr.Error("Type a question or attach an image first.")
        from deepseek_vl2.engine import ImageTagError, chat_conversation
        from deepseek_vl2.utils.io import load_pil_images

        try:
            turn = chat_conversation([{"role": "user", "content": text, "images": list(files)}])
            load_pil_images(turn)  # an unreadable file is refused here, and never enters the conversation
        except ImageTagError as error:
            raise gr.Error(error.detail) from error
        except (ValueError, FileNotFoundError) as error:
            raise gr.Error(str(error)) from error
        history = history + turn
        chat = chat + [{"role": "user", "content": {"path": path}} for path in files]
        chat = chat + [{"role": "user", "content": html.escape(text) or "(image)"}]
        return gr.MultimodalTextbox(value=None, interactive=False), chat, history

    def answer(self, chat: list, history: list, temperature: float, top_p: float, max_new_tokens: int):
        """Stream the answer to the last user turn into the chat; then draw any grounding boxes."""
        from deepseek_vl2.engine import GenerationParams
        from deepseek_vl2.grounding import draw_boxes
        from deepseek_vl2.utils.io import load_pil_images

        try:
            images = load_pil_images(history)
            sample = self.engine.prepare_one(history, images)
        except (ValueError, FileNotFoundError) as error:  # the prompt is too long for the context, say
            # take the turn back (its images and text in the chat, user and assistant in the history), so
            # that the conversation can go on without it
            yield chat[:-(len(history[-2]["images"]) + 1)], history[:-2], gr.skip()
            raise gr.Error(str(error)) from error
        params = GenerationParams(max_new_tokens=int(max_new_tokens), temperature=temperature, top_p=top_p)
        events: queue.Queue = queue.Queue()  # ("text", piece), then ("done", result) or ("error", exception)
        stop = self._start(sample, params, lambda kind, value: events.put((kind, value)))
        chat = chat + [{"role": "assistant", "content": ""}]
        text = ""
        try:
            while True:
                kind, value = events.get()
                if kind == "token":
                    continue
                if kind == "error":
                    raise gr.Error(f"generation failed: {value}")
                if kind == "done":
                    break
                text += value
                chat[-1] = {"role": "assistant", "content": html.escape(text)}
                yield chat, history, gr.skip()
        finally:
            stop()  # the user pressed Stop or left: end the generation
        result = value
        history = history[:-1] + [{"role": "<|Assistant|>", "content": result.text}]
        chat[-1] = {"role": "assistant", "content": html.escape(result.text) or "(empty answer)"}
        drawn = draw_boxes(images[-1], result.boxes) if result.boxes and images else None
        yield chat, history, drawn

    def _start(self, sample, params, on_event):
        """Start answering; returns the function that ends the answer early."""
        from deepseek_vl2.engine import BatchRow

        continuous = self.continuous()
        if continuous is not None:
            return continuous.submit(sample, params, on_event=on_event).cancel
        stopped = threading.Event()
        row = BatchRow(sample, params, on_text=lambda piece: on_event("text", piece), is_cancelled=stopped.is_set)

        def generate():
            try:
                with self._lock:  # one answer at a time on a split model (the page lets several sessions in)
                    result = self.engine.chat_batch([row])[0]
                on_event("done", result)
            except Exception as error:  # shown to the user
                on_event("error", error)

        threading.Thread(target=generate, daemon=True).start()
        return stopped.set

    def build(self):
        with gr.Blocks(title=TITLE) as page:
            gr.Markdown(f"# {TITLE}\n{HINT}")
            history = gr.State([])
            with gr.Row():
                with gr.Column(scale=3):
                    chat = gr.Chatbot(label="Conversation", height=520, elem_id="deepseek_chatbot")
                    box = gr.MultimodalTextbox(placeholder="Ask about the images...", file_count="multiple",
                                               file_types=["image"], show_label=False, elem_id="question")
                    with gr.Row():
                        stop_button = gr.Button("Stop")
                        clear_button = gr.Button("New conversation")
                with gr.Column(scale=2):
                    grounding = gr.Image(label="Grounding boxes (last image)", type="pil", interactive=False)
                    temperature = gr.Slider(0.0, 1.0, value=0.1, step=0.1, label="Temperature (0: greedy)",
                                            elem_id="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                    max_new_tokens = gr.Slider(8, 4096, value=512, step=8, label="Max new tokens",
                                               elem_id="max_new_tokens")
            answering = box.submit(self.add_user_turn, [box, chat, history], [box, chat, history]).success(
                self.answer, [chat, history, temperature, top_p, max_new_tokens], [chat, history, grounding])
            answering.then(lambda: gr.MultimodalTextbox(interactive=True), None, [box])
            stop_button.click(lambda: gr.MultimodalTextbox(interactive=True), None, [box], cancels=[answering])
            clear_button.click(lambda: ([], [], None, gr.MultimodalTextbox(value=None, interactive=True)), None,
                               [chat, history, grounding, box], cancels=[answering])
        return page


def main(argv=None) -> None:
    args = parse_args(argv)
    from deepseek_vl2.engine import ChatEngine

    model = args.model_path or MODEL_IDS.get(args.model_name, args.model_name)
    engine = ChatEngine.from_args(model, args)
    page = Demo(engine, max_num_seqs=args.max_num_seqs).build()
    page.queue(default_concurrency_limit=args.max_num_seqs, max_size=16).launch(
        server_name=args.host, server_port=args.port, share=False, show_error=True)


if __name__ == "__main__":
    main()
