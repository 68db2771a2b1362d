"""Build a random-weight checkpoint of a real Qwen2.5 shape (throughput and memory do not depend
on weight values),
with a chat tokenizer copied from `--tokenizer`.

    python -m src.random_qwen --shape 0.5B --tokenizer DIR --out /tmp/qwen-0.5b
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

# hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings
SHAPES = {
    "0.5B": (896, 4864, 24, 14, 2, 151936, True),
    "1.5B": (1536, 8960, 28, 12, 2, 151936, True),
    "3B": (2048, 11008, 36, 16, 2, 151936, True),
    "7B": (3584, 18944, 28, 28, 4, 152064, False),
    "14B": (5120, 13824, 48, 40, 8, 152064, False),
}


def count(config: dict) -> int:
    """Parameters of a Qwen2 checkpoint from its config.json (biases on q, k, v)."""
    h, inter, layers = (
        config["hidden_size"],
        config["intermediate_size"],
        config["num_hidden_layers"],
    )
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    attention = h * h + 2 * h * kv + (h + 2 * kv) + h * h
    per_layer = attention + 3 * h * inter + 2 * h
    heads = 1 if config.get("tie_word_embeddings") else 2
    return layers * per_layer + h + heads * config["vocab_size"] * h


def build(shape: str, tokenizer_dir: Path, out: Path) -> int:
    """Save the checkpoint to `out`; returns its parameter count."""
    hidden, inter, layers, heads, kv, vocab, tied = SHAPES[shape]
    config = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return model.num_parameters()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=SHAPES, default="0.5B")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    print(args.out, build(args.shape, args.tokenizer, args.out), "parameters")
