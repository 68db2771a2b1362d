"""Chat examples to token ids with the loss on the answer only."""

from __future__ import annotations

from datasets import Dataset

IGNORE = -100  # label id that the causal-LM loss skips


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat template's text of `messages`, up to where the assistant's answer starts."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer(chat_prompt(tokenizer, messages), add_special_tokens=False).input_ids


def answer_ids(tokenizer, answer: str, end_of_turn: bool = True) -> list[int]:
    ids = tokenizer(answer, add_special_tokens=False).input_ids
    return [*ids, tokenizer.eos_token_id] if end_of_turn else ids


def tokenize(tokenizer, example: dict, max_len: int) -> dict:
    """Prompt tokens are masked out of the labels; the answer and its end-of-turn token count.

    Truncation cuts the prompt from the left so the answer is always kept.
    """
    prompt = prompt_ids(tokenizer, example["messages"])
    return _supervised(prompt, answer_ids(tokenizer, example["answer"]), max_len)


def _supervised(prompt: list[int], answer: list[int], max_len: int) -> dict:
    answer = answer[:max_len]
    prompt = prompt[max(0, len(prompt) + len(answer) - max_len) :]
    ids = prompt + answer
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [IGNORE] * len(prompt) + answer,
    }


def to_dataset(tokenizer, examples: list[dict], max_len: int) -> Dataset:
    """`tokenize` for every example, the tokenizer called once for all prompts and once for
    all answers (a fast tokenizer batches in Rust: half the time of one call per example)."""
    if not examples:
        return Dataset.from_list([])
    texts = [chat_prompt(tokenizer, e["messages"]) for e in examples]
    prompts = tokenizer(texts, add_special_tokens=False).input_ids
    answers = tokenizer([e["answer"] for e in examples], add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    rows = [_supervised(p, [*a, eos], max_len) for p, a in zip(prompts, answers, strict=True)]
    return Dataset.from_list(rows)
