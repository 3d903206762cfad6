"""Comparing two decode paths of one model (the fast path of static caches, CUDA graphs and compiled
regions against the plain path): greedy runs with per-step scores, and the near-tie rule for where
their tokens may part. Used by the GPU tests (tests/gpu, tests/quantization, tests/kernels)."""
import torch


def first_divergence(a, b):
    diff = (a != b).nonzero()
    return None if not len(diff) else diff[0, -1].item()


def text_prompt(model, length=40, seed=0):
    """A random text prompt on the GPU as the language model's input embeddings, and its mask."""
    ids = torch.randint(0, 1000, (1, length), generator=torch.Generator().manual_seed(seed)).cuda()
    with torch.no_grad():
        return model.language.get_input_embeddings()(ids), torch.ones_like(ids, dtype=torch.bool)


def greedy(lm, embeds, mask, n, graphs, check_in_graph=True):
    """Greedy tokens and per-step scores (graphs: the fast path's host loop, which returns scores;
    its sequences are also checked against the in-graph greedy loop, which does not)."""
    lm.cuda_graphs = graphs
    try:
        kw = dict(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        out = lm.generate(**kw, return_dict_in_generate=True, output_scores=True)
        if graphs and check_in_graph:
            assert torch.equal(lm.generate(**kw), out.sequences), "in-graph greedy differs from the host loop"
        return out
    finally:
        lm.cuda_graphs = True


def finite_difference(a, b) -> float:
    """Largest |a - b| over entries finite in both (suppressed tokens are -inf in both)."""
    a, b = a.float(), b.float()
    both = torch.isfinite(a) & torch.isfinite(b)
    return (a[both] - b[both]).abs().max().item()


def assert_same_or_near_tie(fast, plain):
    """Fast-path tokens equal the plain path's, or first differ at a near-tie: a step whose plain-path
    top-2 margin is within twice the numerical noise between the two paths, measured as the largest
    logit difference over the steps before (same tokens so far, so any difference is rounding)."""
    for row in range(plain.sequences.shape[0]):
        i = first_divergence(fast.sequences[row], plain.sequences[row])
        if i is None:
            continue
        noise = max(finite_difference(fast.scores[s][row], plain.scores[s][row]) for s in range(i + 1))
        top = plain.scores[i][row].float().topk(2).values
        margin = (top[0] - top[1]).item()
        print(f"row {row}: first difference at step {i}, plain margin {margin:.3f}, path noise {noise:.3f}")
        assert margin <= 2 * noise, f"row {row} differs at step {i}: margin {margin:.4f} > 2 x noise {noise:.4f}"


def finite_scale(scores) -> float:
    """Largest |score| over finite entries (EOS is -inf before min_new_tokens)."""
    return scores[torch.isfinite(scores)].abs().max().item()
