"""web_demo.py in a real browser: start it on the tiny offline checkpoint, open the page in headless
Chromium, attach an image, ask a question, and check that the streamed answer is the engine's greedy
answer. A screenshot is saved (its path is printed; run pytest with -s to see it).

Needs gradio, playwright (the Python package; it drives Debian's /usr/bin/chromium and downloads no
browser) and Chromium. .ci/run installs all three (gradio after the project and then the project's
Pillow again, as gradio caps Pillow below the release the processor goldens need) and sets
DEEPSEEK_VL2_REQUIRE_BROWSER=1, under which a missing one fails the test; elsewhere it is skipped
with the reason.
"""
import importlib.util
import os
import re
import shutil

import pytest
import torch
from PIL import Image

from deepseek_vl2.engine import ChatEngine, GenerationParams
from serve_helpers import start_process, stop_process, tiny_checkpoint

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
QUESTION = "What colour is the square?"
MAX_NEW_TOKENS = 16


def browser_requirements() -> str:
    """The Chromium executable; skips (fails under DEEPSEEK_VL2_REQUIRE_BROWSER=1) if something is missing."""
    give_up = pytest.fail if os.environ.get("DEEPSEEK_VL2_REQUIRE_BROWSER") == "1" else pytest.skip
    missing = [name for name in ("gradio", "playwright") if importlib.util.find_spec(name) is None]
    if missing:
        give_up(f"{' and '.join(missing)} not installed: pip install 'gradio>=5' playwright")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        give_up("Chromium not found: apt-get install -y chromium")
    return chromium


def letters_and_digits(text: str) -> str:
    """What survives markdown rendering unchanged."""
    return re.sub(r"[^A-Za-z0-9]", "", text)


def test_web_demo_answers_in_the_browser(tmp_path_factory, tmp_path):
    chromium = browser_requirements()
    from playwright.sync_api import sync_playwright

    checkpoint = tiny_checkpoint(tmp_path_factory)
    image_path = tmp_path / "square.png"
    Image.new("RGB", (160, 120), (30, 160, 40)).save(image_path)
    engine = ChatEngine.load(str(checkpoint), device="cpu", dtype=torch.float32)
    conversation = [{"role": "<|User|>", "content": "<image>\n" + QUESTION}, {"role": "<|Assistant|>", "content": ""}]
    expected = engine.chat(conversation, [Image.open(image_path).convert("RGB")],
                           GenerationParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0)).text

    process, base = start_process(["web_demo.py", "--model_path", str(checkpoint), "--device", "cpu", "--dtype",
                                   "float32"], "/", tmp_path / "web_demo.log")
    screenshot = tmp_path / "web_demo.png"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
                viewport={"width": 1280, "height": 1000})
            page = browser.new_page()
            page.goto(base, wait_until="domcontentloaded")
            page.wait_for_selector("#question textarea", timeout=60_000)
            for slider, value in (("#temperature", "0"), ("#max_new_tokens", str(MAX_NEW_TOKENS))):
                page.locator(f"{slider} input[type=number]").fill(value)
                page.locator(f"{slider} input[type=number]").press("Enter")
            page.locator("#question input[type=file]").set_input_files(str(image_path))
            page.wait_for_selector("#question img", timeout=30_000)  # the attachment's thumbnail
            page.locator("#question textarea").fill(QUESTION)
            page.locator("#question textarea").press("Enter")
            answer = page.locator("#deepseek_chatbot .bot").last
            answer.wait_for(timeout=60_000)
            page.wait_for_function("() => !document.querySelector('#question textarea').disabled", timeout=60_000)
            shown = answer.inner_text()
            assert page.locator("#deepseek_chatbot .user img").count() >= 1, "the uploaded image is not in the chat"
            page.screenshot(path=str(screenshot), full_page=True)
            browser.close()
    finally:
        stop_process(process)
    print(f"web demo screenshot: {screenshot}")
    assert expected.strip(), "the engine gave an empty answer"
    assert letters_and_digits(shown) == letters_and_digits(expected), (shown, expected)


def test_a_turn_that_cannot_be_answered_leaves_the_conversation_as_it_was(tmp_path_factory, tmp_path, monkeypatch):
    """An unreadable attachment is refused before it enters the conversation, and a turn whose prompt
    the engine refuses (too long for the context, say) is taken back: in both cases the next question
    is answered (before, one bad image made every later turn fail)."""
    gr = pytest.importorskip("gradio")  # installed by .ci/run, as for the browser test
    from web_demo import Demo

    engine = ChatEngine.load(str(tiny_checkpoint(tmp_path_factory)), device="cpu", dtype=torch.float32)
    demo = Demo(engine, max_num_seqs=2)
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    image = tmp_path / "square.png"
    Image.new("RGB", (64, 48), (30, 160, 40)).save(image)

    def ask(text, files, chat, history):
        _, chat, history = demo.add_user_turn({"text": text, "files": files}, chat, history)
        *_, (last_chat, last_history, _) = demo.answer(chat, history, 0.0, 0.9, 4)
        return last_chat, last_history

    try:
        with pytest.raises(gr.Error, match=r"cannot read image .*fake\.png"):
            demo.add_user_turn({"text": "What is this?", "files": [str(fake)]}, [], [])
        chat, history = ask("Hello", [], [], [])
        assert [turn["role"] for turn in history] == ["<|User|>", "<|Assistant|>"] and history[1]["content"]

        refuse = ValueError("the prompt is too long for the model's context")
        monkeypatch.setattr(engine, "prepare_one", lambda *args: (_ for _ in ()).throw(refuse))
        _, longer_chat, longer_history = demo.add_user_turn({"text": "And this?", "files": [str(image)]}, chat,
                                                            history)
        assert len(longer_chat) == len(chat) + 2 and len(longer_history) == len(history) + 2
        answering = demo.answer(longer_chat, longer_history, 0.0, 0.9, 4)
        assert next(answering)[:2] == (chat, history)  # the turn taken back
        with pytest.raises(gr.Error, match="too long"):
            next(answering)
        monkeypatch.undo()
        chat, history = ask("And now?", [str(image)], chat, history)
        assert [turn["role"] for turn in history] == ["<|User|>", "<|Assistant|>"] * 2 and history[3]["content"]
    finally:
        if demo._continuous is not None:
            demo._continuous.close()
