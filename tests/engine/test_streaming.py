"""Streaming without a model: `TextStream` skips the prompt, hides EOS/pad, waits out incomplete UTF-8,
cuts at stop strings; `RowsEnd` and `BatchStream` end rows one by one."""
import torch

from deepseek_vl2.engine import BatchRow, BatchStream, GenerationParams, RowsEnd, TextStream

EOS, PAD = 1, 2
PIECES = {3: "Hel", 4: "lo", 5: " wor", 6: "ld", 7: "\ufffd", 8: "é", EOS: "<eos>", PAD: "<pad>"}


class FakeTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        text = "".join(PIECES[i] for i in ids)
        return text.replace("\ufffdé", "é")  # id 7 alone is half a character; with 8 it completes


def test_text_stream_pieces_stop_strings_and_hidden_ids():
    pieces = []
    stream = TextStream(FakeTokenizer(), hidden_ids=[EOS, PAD], stop=["wor"], on_text=pieces.append)
    stream.put(torch.tensor([[3, 4]]))  # the prompt: ignored
    for token in [3, 4, 7, 8, 5, 6, EOS]:
        stream.put(torch.tensor([token]))
    stream.end()
    assert pieces == ["Hel", "lo", "é", " "]  # nothing for the half character; cut before "wor"
    assert stream.text == "Helloé " and stream.stopped
    assert stream.first_token_time is not None and stream.end_time >= stream.first_token_time


def test_rows_end_each_row_on_its_own():
    rows = [BatchRow(None, GenerationParams(max_new_tokens=2)), BatchRow(None, GenerationParams(max_new_tokens=5))]
    streams = [TextStream(FakeTokenizer(), [EOS, PAD]) for _ in rows]
    rows_end = RowsEnd(rows, streams, prompt_len=2, eos_id=EOS)
    batch_stream = BatchStream(streams, rows_end)
    ids = torch.tensor([[3, 4], [3, 4]])
    batch_stream.put(ids)
    for step in ([3, 3], [4, EOS], [5, 5]):
        ids = torch.cat([ids, torch.tensor(step)[:, None]], dim=1)
        batch_stream.put(torch.tensor(step))
        done = rows_end(ids, None)
    assert done.tolist() == [True, True]
    assert rows_end.lengths == [2, 2]  # row 0: max_new_tokens; row 1: EOS at its second token
    assert [s.text for s in streams] == ["Hello", "Hel"]


def stream_pieces(tokenizer, ids, stop=()):
    pieces = []
    stream = TextStream(tokenizer, hidden_ids=[EOS, PAD], stop=stop, on_text=pieces.append)
    stream.put(torch.tensor([[3]]))
    for token in ids:
        stream.put(torch.tensor([token]))
    stream.end()
    return pieces, stream


def test_text_that_may_start_a_stop_string_is_held_back():
    # " wor" could begin "world": held back, and never shown once "world" completes
    pieces, stream = stream_pieces(FakeTokenizer(), [3, 4, 5, 6], stop=["world"])
    assert pieces == ["Hel", "lo", " "] and stream.text == "Hello " and stream.stopped
    # "wor" could begin "worx", then "ld" shows it was not a stop string: it is shown after all
    pieces, stream = stream_pieces(FakeTokenizer(), [3, 4, 5, 6], stop=["worx"])
    assert pieces == ["Hel", "lo", " ", "world"] and stream.text == "Hello world" and not stream.stopped
    # held back when the row ends without the stop string completing: shown at the end
    pieces, stream = stream_pieces(FakeTokenizer(), [3, 4, 5], stop=["world"])
    assert "".join(pieces) == stream.text == "Hello wor" and pieces[-1] == "wor"
    # a stop string spread over several pieces, and one inside a single piece
    pieces, stream = stream_pieces(FakeTokenizer(), [3, 4, 5, 6], stop=["lo wo"])
    assert "".join(pieces) == stream.text == "Hel"
    pieces, stream = stream_pieces(FakeTokenizer(), [3, 4, 5, 6], stop=["o"])
    assert pieces == ["Hel", "l"] and stream.text == "Hell"


class CountingTokenizer:
    """Byte-level ids (id = byte + 10) decoded as UTF-8; records the longest window decoded."""

    def __init__(self):
        self.longest = 0

    def decode(self, ids, skip_special_tokens=False):
        self.longest = max(self.longest, len(ids))
        return bytes(i - 10 for i in ids).decode("utf-8", errors="replace")


def test_decoding_is_incremental_and_keeps_multibyte_characters_whole():
    answer = "naïve 東京 🙂 " * 300
    ids = [b + 10 for b in answer.encode()]
    tokenizer = CountingTokenizer()
    pieces, stream = stream_pieces(tokenizer, ids)
    assert stream.text == "".join(pieces) == answer
    assert "\ufffd" not in "".join(pieces)
    assert tokenizer.longest <= 12, "the streamer decodes more than a window of recent ids"


def test_streamed_text_equals_a_full_decode_with_the_fixture_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from goldens import FIXTURES

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(FIXTURES / "tokenizer"))
    text = "Ein Bär aß 寿司 🍣🍣 at 3:00 — naïve café, \n\n  <|ref|>cat<|/ref|> 😀👍🏽 done."
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces, stream = stream_pieces(tokenizer, ids)
    assert "".join(pieces) == stream.text == tokenizer.decode(ids)


def test_text_stream_holds_back_what_may_start_a_stop_string():
    pieces = []
    stream = TextStream(FakeTokenizer(), hidden_ids=[EOS], stop=["low"], on_text=pieces.append)
    stream.put(torch.tensor([[3]]))
    for token in [3, 4, 6]:  # "Hel" ("l" may begin "low": held), "lo" ("lo" held), "ld" (not a start)
        stream.put(torch.tensor([token]))
    assert pieces == ["He", "l", "lold"] and not stream.stopped
    stream.put(torch.tensor([4]))  # "lo" held again; the stream ends without "low": shown at the end
    assert pieces == ["He", "l", "lold"]
    stream.end()
    assert "".join(pieces) == stream.text == "Helloldlo"


def test_the_backend_decoder_streams_what_the_tokenizer_decode_streams():
    """`text_decoder` takes the fast tokenizer's backend (the fixture's does not clean up spaces); the
    pieces of random ids, lone bytes and special tokens included, and those cut at stop strings,
    equal the pieces through `tokenizer.decode`."""
    import random

    from transformers import PreTrainedTokenizerFast

    from deepseek_vl2.engine.streaming import text_decoder
    from goldens import FIXTURES

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(FIXTURES / "tokenizer"))
    assert text_decoder(tokenizer).func == tokenizer.backend_tokenizer.decode

    class ThroughDecode:  # the wrapper's own decode: text_decoder finds no backend here
        decode = tokenizer.decode

    draw = random.Random(0)
    for stop in [(), ("e", "ab", "</")]:
        ids = [draw.randrange(len(tokenizer)) for _ in range(400)]
        texts = []
        for decoder_of in (tokenizer, ThroughDecode()):
            pieces = []
            stream = TextStream(decoder_of, hidden_ids=[tokenizer.eos_token_id], stop=stop, on_text=pieces.append)
            stream.put(torch.tensor([1]))
            for token in ids:
                stream.add([token])
            stream.end()
            texts.append((pieces, stream.text, stream.stopped))
        assert texts[0] == texts[1] and texts[0][1]
