"""The language model: embedding -> dropout -> LSTM -> dropout -> linear decoder."""

import torch
from torch import nn

from ..nn import LSTM, Dropout, initialize_gates

IMPLEMENTATIONS = {"ext": LSTM, "torch": nn.LSTM}


class LanguageModel(nn.Module):
    """`impl="torch"` swaps in torch.nn.LSTM. The parameters are created in the same order and
    the two LSTMs initialise identically, so the same seed gives the same initial weights and the
    two can be compared run for run. `tied` shares the embedding with the decoder, which needs
    the LSTM's output size (proj_size, else hidden) to equal the embedding size."""

    def __init__(self, vocab_size, embedding_size=64, hidden_size=512, layers=2, dropout=0.0,
                 proj_size=0, tied=False, impl="ext", forget_bias=0.0, weight_drop=0.0,
                 recurrent_dropout=0.0, zoneout=(0.0, 0.0), layer_norm=False):
        super().__init__()
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"--impl must be one of {sorted(IMPLEMENTATIONS)}, got {impl!r}")
        variants = {"weight_drop": weight_drop, "recurrent_dropout": recurrent_dropout,
                    "zoneout": tuple(zoneout), "layer_norm": layer_norm}
        variants = {name: value for name, value in variants.items() if any(
            value if isinstance(value, tuple) else (value,))}
        if variants and impl != "ext":
            raise ValueError(
                f"--{next(iter(variants)).replace('_', '-')} needs --impl ext: torch.nn.LSTM "
                f"has no DropConnect on its recurrent weights (the usual wrapper breaks on "
                f"cuDNN's flattened weights), no dropout on its recurrent connection, no "
                f"zoneout and no layer normalisation")
        output_size = proj_size or hidden_size
        if tied and output_size != embedding_size:
            raise ValueError(
                f"--tied needs the LSTM output size ({output_size}) to equal --emb "
                f"({embedding_size}); add --proj-size {embedding_size} or set --emb {output_size}"
            )
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.dropout = Dropout(dropout)
        self.lstm = IMPLEMENTATIONS[impl](
            embedding_size, hidden_size, layers, dropout=dropout if layers > 1 else 0.0,
            proj_size=proj_size, **variants,
        )
        # The same initialisation for either implementation (the function takes nn.LSTM too).
        initialize_gates(self.lstm, forget_bias=forget_bias)
        self.decoder = nn.Linear(output_size, vocab_size)
        if tied:
            self.decoder.weight = self.embedding.weight
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, tokens, state=None):
        """tokens (steps, batch) -> logits (steps, batch, vocab), (h, c)."""
        output, state = self.lstm(self.dropout(self.embedding(tokens)), state)
        return self.decoder(self.dropout(output)), state


def detach_state(state):
    """The state carried into the next BPTT window, cut from the graph of the last one."""
    return None if state is None else tuple(s.detach() for s in state)


@torch.no_grad()
def sample_next(logits, temperature=1.0, top_k=0, generator=None):
    """One token id per row of logits (batch, vocab): greedy at temperature 0, else sampled
    from the softmax at that temperature, optionally restricted to the top_k tokens."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.size(-1):
        threshold = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probabilities = torch.softmax(logits, dim=-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(-1)


def build_model(config, vocabulary_size):
    torch.manual_seed(config.seed)
    model = LanguageModel(vocabulary_size, config.emb, config.hidden, config.layers,
                          config.dropout, config.proj_size, config.tied, config.impl,
                          config.forget_bias, config.weight_drop, config.recurrent_dropout,
                          config.zoneout, config.layer_norm)
    return model.to(torch.float64) if config.precision == "fp64" else model
