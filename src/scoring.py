"""Log-probabilities of fixed answer choices: classification without string-matching free text."""

from __future__ import annotations

import torch

from src.data import answer_ids, prompt_ids


@torch.no_grad()
def choice_logprobs(model, tokenizer, examples: list[dict], batch_size: int) -> list[list[float]]:
    """For each example, sum of log p(choice tokens | prompt) for each of its `choices`."""
    pairs = []  # (example index, prompt ids, choice ids)
    for i, ex in enumerate(examples):
        prompt = prompt_ids(tokenizer, ex["messages"])
        choices = [answer_ids(tokenizer, c, end_of_turn=False) for c in ex["choices"]]
        if all(len(c) == 1 for c in choices):  # one forward pass scores every choice
            pairs.append((i, prompt, [c[0] for c in choices], True))
        else:
            pairs += [(i, prompt, c, False) for c in choices]
    order = sorted(range(len(pairs)), key=lambda k: len(pairs[k][1]) + len(pairs[k][2]))
    flat: list[list[float]] = [[] for _ in pairs]
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = [pairs[k] for k in order[start : start + batch_size]]
        for k, value in zip(
            order[start : start + batch_size], _score_batch(model, chunk), strict=True
        ):
            flat[k] = value
    model.train(was_training)
    out: list[list[float]] = [[] for _ in examples]
    for (i, *_), values in zip(pairs, flat, strict=True):
        out[i].extend(values)
    return out


def _score_batch(model, chunk: list[tuple]) -> list[list[float]]:
    """Left-padded so every choice ends at the last position: only its logits are computed.

    A row is either prompt + one choice (its summed log-probability), or, when every choice
    is one token, the prompt alone (the log-probability of each choice token after it).
    """
    seqs = [p if single else p + c for _, p, c, single in chunk]
    width = max(map(len, seqs))
    keep = max(1 if single else len(c) for _, _, c, single in chunk) + 1
    device = next(model.parameters()).device
    ids = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq) :] = torch.tensor(seq, device=device)
        mask[row, width - len(seq) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep
    ).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)  # position t predicts token t+1
    targets = ids[:, width - keep + 1 :]
    picked = logprobs[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    scores = []
    for row, (_, _, choice, single) in enumerate(chunk):
        if single:
            scores.append(logprobs[row, -1, choice].tolist())
        else:
            scores.append([picked[row, keep - 1 - len(choice) :].sum().item()])
    return scores
