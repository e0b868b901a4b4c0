"""Tiny randomly initialised causal LMs (no download) and small texts for pipeline and app tests."""

import random
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

VOCAB = 120


def tiny_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True)).eval()
    if family == "mistral":  # Mistral v0.3-style: no sliding window
        return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()
    if family == "qwen2":  # q/k/v carry biases
        return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True)).eval()
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16)).eval()
    raise ValueError(f"no tiny {family!r} model: {FAMILIES}")


# Words of the small file: texts (documents separated by blank lines, each naming its file and index,
# so two texts never share a document).
WORDS = (
    "the of and a to in is was he for it with as his on be at by this had not are but from or have an they"
)


def write_text(path: Path, seed: int, docs: int = 40) -> str:
    """`docs` documents of 100 random common words at `path`; returns its text spec (file:PATH)."""
    rng = random.Random(seed)
    words = WORDS.split()
    path.write_text(
        "\n\n".join(f"{path.stem} {i}. " + " ".join(rng.choices(words, k=100)) for i in range(docs))
    )
    return f"file:{path}"


def save_tiny_model(directory: Path) -> torch.nn.Module:
    """A tiny random Llama with the bundled model's tokenizer, saved as a Hugging Face folder."""
    from transformers import AutoTokenizer

    from sigmascale_core.models import bundled_model_dir

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir())
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model
