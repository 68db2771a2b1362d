"""Batched greedy generation for the objectives that score free text (SQuAD, AlpacaEval)."""

from __future__ import annotations

import torch

from src.data import prompt_ids


@torch.no_grad()
def generate(
    model, tokenizer, examples: list[dict], batch_size: int, max_new_tokens: int
) -> list[str]:
    """The model's answer to each example's `messages`, greedy, at most `max_new_tokens`.

    Prompts are sorted by length and left-padded so a batch wastes little; the answers come
    back in the examples' order, special tokens removed.
    """
    prompts = [prompt_ids(tokenizer, e["messages"]) for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    out: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(rows):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            use_cache=True,
        )
        for row, i in enumerate(rows):
            out[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
    model.train(was_training)
    return out
