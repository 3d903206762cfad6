"""devices.replicate: a model's copy with its own tensors on the target device, equal values, the
same module structure and tied weights still tied."""
import torch

from deepseek_vl2.modeling.devices import replicate


def test_replicate_copies_every_tensor_once_and_keeps_ties(tiny_lm):
    tiny_lm.lm_head.weight = tiny_lm.model.embed_tokens.weight  # a tie, as tie_word_embeddings makes
    twin = replicate(tiny_lm, "cpu")
    assert twin is not tiny_lm and type(twin) is type(tiny_lm)
    assert twin.lm_head.weight is twin.model.embed_tokens.weight
    mine, theirs = dict(tiny_lm.named_parameters()), dict(twin.named_parameters())
    assert mine.keys() == theirs.keys()
    for name, param in theirs.items():
        assert param.data_ptr() != mine[name].data_ptr(), name
        assert torch.equal(param, mine[name]) and not param.requires_grad, name
    for (name, buffer), (_, original) in zip(twin.named_buffers(), tiny_lm.named_buffers()):
        assert buffer.data_ptr() != original.data_ptr() and torch.equal(buffer, original), name
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        assert torch.equal(twin(input_ids=ids).logits, tiny_lm(input_ids=ids).logits)
