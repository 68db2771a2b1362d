from __future__ import annotations

import torch

from src.data import IGNORE, answer_ids, prompt_ids, tokenize
from src.models import load_4bit_model, load_tokenizer
from src.scoring import choice_logprobs


def _direct(model, tokenizer, messages, choice):
    """Sum of log p(choice tokens | prompt) from one unpadded forward pass."""
    prompt, target = (
        prompt_ids(tokenizer, messages),
        answer_ids(tokenizer, choice, end_of_turn=False),
    )
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0]
    return sum(logprobs[len(prompt) - 1 + i, t].item() for i, t in enumerate(target))


def test_batched_left_padded_scores_equal_direct_ones(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    model = load_4bit_model(str(tiny_model), torch.float32)
    examples = [
        {"messages": [{"role": "user", "content": "short"}], "choices": ["negative", "positive"]},
        {
            "messages": [{"role": "user", "content": "a much longer prompt than the first one"}],
            "choices": ["no way at all", "yes"],
        },  # multi-token choices take the other path
    ]
    got = choice_logprobs(model, tokenizer, examples, batch_size=3)
    for ex, scores in zip(examples, got, strict=True):
        want = [_direct(model, tokenizer, ex["messages"], c) for c in ex["choices"]]
        assert torch.allclose(torch.tensor(scores), torch.tensor(want), atol=1e-3), (scores, want)


def test_loss_only_on_the_answer(tiny_model):
    tokenizer = load_tokenizer(str(tiny_model))
    ex = {
        "messages": [{"role": "user", "content": "Review: fine\nSentiment?"}],
        "answer": "positive",
    }
    row = tokenize(tokenizer, ex, max_len=256)
    supervised = [t for t in row["labels"] if t != IGNORE]
    assert supervised == answer_ids(tokenizer, "positive")
    assert supervised[-1] == tokenizer.eos_token_id
    short = tokenize(tokenizer, ex, max_len=6)  # truncation keeps the answer
    assert len(short["input_ids"]) == 6 and short["labels"][-len(supervised) :] == supervised
