"""row_sampling.py: a batch of rows with different settings gets, row by row, what each row gets
alone; only rows with a repetition penalty write their histories; unusable rows are flagged."""
import torch

from deepseek_vl2.engine.params import GenerationParams
from deepseek_vl2.engine.row_sampling import Chosen, Histories, RowSampler, choose_tokens

VOCAB, EOS, PROMPT = 50, 2, 6
PARAMS = {  # slot -> settings
    2: GenerationParams(max_new_tokens=8, temperature=0),
    0: GenerationParams(max_new_tokens=8, temperature=0.9, top_p=1.0, top_k=0, repetition_penalty=1.3, seed=5),
    3: GenerationParams(max_new_tokens=8, temperature=0.7, top_p=0.8, repetition_penalty=1.0, seed=9),
    1: GenerationParams(max_new_tokens=8, temperature=0),
}


def _rows(slots):
    """Samplers and histories for `slots`, each history a prompt of its own."""
    histories = Histories(4, 16, torch.device("cpu"))
    samplers = []
    for slot in slots:
        samplers.append(RowSampler(PARAMS[slot], PROMPT, 8, EOS, VOCAB, torch.device("cpu")))
        histories.start(slot, torch.arange(PROMPT) * 3 + slot)
    return samplers, histories


def test_a_mixed_batch_gives_each_row_what_it_gets_alone():
    slots = [2, 0, 3, 1]
    logits = torch.randn(3, len(slots), VOCAB, generator=torch.Generator().manual_seed(0))
    samplers, histories = _rows(slots)
    alone = [_rows([slot]) for slot in slots]
    before = histories.ids.clone()
    for step in range(3):
        choice = choose_tokens(logits[step], samplers, slots, histories)
        assert choice.shape == (2, len(slots)) and choice.dtype == torch.long
        for i, slot in enumerate(slots):
            single = choose_tokens(logits[step, i:i + 1], alone[i][0], [slot], alone[i][1])
            assert choice[:, i].tolist() == single[:, 0].tolist(), (step, slot)
        assert choice[1].tolist() == [0, 0, 0, 0]
    assert [s.generated for s in samplers] == [3, 3, 3, 3]
    assert choice[0, 0] == logits[2, 0].argmax() and choice[0, 3] == logits[2, 3].argmax()  # the greedy rows
    # the penalised row (slot 0) has its three tokens after its prompt; the others' histories are untouched
    changed = (histories.ids != before).any(dim=1).tolist()
    assert changed == [True, False, False, False]
    assert histories.ids[0, PROMPT:PROMPT + 3].tolist() == alone[1][1].ids[0, PROMPT:PROMPT + 3].tolist()


def test_rows_without_a_token_are_flagged():
    samplers, histories = _rows([2, 1])
    logits = torch.randn(2, VOCAB)
    logits[1] = float("nan")
    choice = choose_tokens(logits, samplers, [2, 1], histories)
    assert choice[1].tolist() == [0, 1]
    chosen = Chosen(["a", "b"], choice)
    assert chosen.values() == [("a", int(logits[0].argmax()), 0), ("b", int(choice[0, 1]), 1)]
