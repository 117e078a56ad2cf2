"""Sampling text from a trained language model, one token at a time."""

import torch

from . import data as lm_data
from .model import sample_next


@torch.no_grad()
def generate(model, vocabulary, level, prompt, tokens, temperature=1.0, top_k=0, seed=None,
             device="cpu"):
    """Yields the text of each generated token, carrying the LSTM state one step at a time."""
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    prompt_tokens = lm_data.tokenize(prompt, level) if prompt else []
    ids = vocabulary.encode(prompt_tokens or [lm_data.EOS if level == "word" else "\n"])
    logits, state = model(ids.to(device).view(-1, 1))
    unknown = vocabulary.stoi[lm_data.UNK]
    for _ in range(tokens):
        # The unknown token stands for what training never saw: never emit it.
        logits[-1, :, unknown] = float("-inf")
        next_id = sample_next(logits[-1], temperature, top_k, generator)
        token = vocabulary.itos[int(next_id)]
        if level == "char":
            yield token
        else:
            yield "\n" if token == lm_data.EOS else " " + token
        logits, state = model(next_id.view(1, 1), state)
