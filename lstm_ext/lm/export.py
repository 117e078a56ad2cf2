"""`lstm-ext export`: a trained language model as a file another runtime serves, with the
LSTM state as an input and an output so that a server can generate one token at a time."""

import torch
from torch import nn

from .checkpoint import load_checkpoint, model_from_checkpoint

FORMATS = ("onnx", "aoti")


class StepModel(nn.Module):
    """tokens (steps, batch) int64, h0 and c0 (layers, batch, state) -> logits (steps, batch,
    vocabulary), h_n, c_n: the model with its state explicit."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, h0, c0):
        logits, (h_n, c_n) = self.model(tokens, (h0, c0))
        return logits, h_n, c_n


def example_inputs(model, steps=8, batch=2):
    lstm = model.lstm
    dtype = lstm.weight_ih_l0.dtype
    return (torch.zeros(steps, batch, dtype=torch.long),
            torch.zeros(lstm.num_layers, batch, lstm.proj_size or lstm.hidden_size, dtype=dtype),
            torch.zeros(lstm.num_layers, batch, lstm.hidden_size, dtype=dtype))


def write_vocabulary(path, vocabulary, lstm):
    """What a server needs beside the model: a first line "layers state_size hidden_size" (the
    shapes of h0 and c0), then one token per line, id order, as the hex of its UTF-8 bytes (so
    that a newline or any other character is one plain line); examples/serve_cpp reads it."""
    lines = [f"{lstm.num_layers} {lstm.proj_size or lstm.hidden_size} {lstm.hidden_size}"]
    lines += [token.encode("utf-8").hex() for token in vocabulary.itos]
    with open(path, "w") as file:
        file.write("\n".join(lines) + "\n")


def export(checkpoint, fmt, out):
    """Writes the checkpoint's model to `out` as ONNX or as an AOTInductor package, and its
    vocabulary to `out`.vocab; returns a description of the files, inputs and outputs."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    model, vocabulary, config = model_from_checkpoint(load_checkpoint(checkpoint))
    step_model = StepModel(model).eval()
    steps, batch = torch.export.Dim("steps", min=1), torch.export.Dim("batch", min=1)
    dynamic = {"tokens": {0: steps, 1: batch}, "h0": {1: batch}, "c0": {1: batch}}
    inputs = example_inputs(model)
    with torch.no_grad():
        if fmt == "onnx":
            program = torch.onnx.export(step_model, inputs, dynamo=True,
                                        dynamic_shapes=dynamic, verbose=False)
            program.save(str(out))
        else:
            program = torch.export.export(step_model, inputs, dynamic_shapes=dynamic)
            torch._inductor.aoti_compile_and_package(program, package_path=str(out))
    write_vocabulary(f"{out}.vocab", vocabulary, model.lstm)
    return {"format": fmt, "out": str(out), "vocabulary_file": f"{out}.vocab",
            "vocabulary": len(vocabulary), "level": config.level,
            "inputs": {"tokens": "(steps, batch) int64", "h0": list(inputs[1].shape[::2]),
                       "c0": list(inputs[2].shape[::2])},
            "outputs": ["logits (steps, batch, vocabulary)", "h_n", "c_n"]}
