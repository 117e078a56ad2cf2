"""Deployment paths of a model holding lstm_ext modules: torch.jit.trace (stable, saved and
loaded, for other lengths and batches), torch.jit.script (refused with what to use),
torch.export with dynamic length and batch, and an AOTInductor package of it."""

import io

import pytest
import torch
from torch import nn

import lstm_ext


class Tagger(nn.Module):
    """A small model as users write them: embedding, our LSTM, a linear head."""

    def __init__(self, **lstm_options):
        super().__init__()
        self.embedding = nn.Embedding(20, 8)
        self.lstm = lstm_ext.LSTM(8, 16, num_layers=2, **lstm_options)
        directions = 2 if self.lstm.bidirectional else 1
        self.head = nn.Linear(directions * (self.lstm.proj_size or 16), 5)

    def forward(self, tokens):
        output, (h_n, c_n) = self.lstm(self.embedding(tokens))
        return self.head(output), h_n, c_n


@pytest.mark.parametrize("options", [{}, {"bidirectional": True, "proj_size": 4,
                                          "batch_first": True}], ids=["plain", "bidir-proj-bf"])
def test_jit_trace_is_stable_saves_and_runs_other_shapes(options):
    torch.manual_seed(0)
    model = Tagger(**options).eval()
    example = torch.randint(0, 20, (6, 3))
    traced = torch.jit.trace(model, (example,))  # checks its graph across invocations
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    for shape in ((6, 3), (11, 3), (4, 5)):  # the traced graph takes other lengths and batches
        tokens = torch.randint(0, 20, shape)
        expected = model(tokens)
        for module in (traced, loaded):
            for got, want in zip(module(tokens), expected):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    # A traced module still trains: gradients reach our LSTM's weights.
    traced(example)[0].square().sum().backward()
    assert model.lstm.weight_hh_l0.grad is not None and model.lstm.weight_hh_l0.grad.abs().sum() > 0


def test_jit_trace_of_a_cell():
    torch.manual_seed(1)
    cell = lstm_ext.LSTMCell(8, 16)
    x, state = torch.randn(3, 8), (torch.randn(3, 16), torch.randn(3, 16))
    traced = torch.jit.trace(cell, (x, state))
    x2, state2 = torch.randn(3, 8), (torch.randn(3, 16), torch.randn(3, 16))
    for got, want in zip(traced(x2, state2), cell(x2, state2)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("make", [lambda: Tagger(), lambda: lstm_ext.LSTMCell(4, 6)],
                         ids=["model with an LSTM", "LSTMCell"])
def test_jit_script_is_refused_with_what_to_use_instead(make):
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile lstm_ext") as error:
        torch.jit.script(make())
    assert "torch.jit.trace" in str(error.value) and "torch.export" in str(error.value)


def export_tagger(**options):
    torch.manual_seed(0)
    model = Tagger(**options).eval()
    steps, batch = torch.export.Dim("steps", min=2, max=4096), torch.export.Dim("batch", max=1024)
    program = torch.export.export(model, (torch.randint(0, 20, (6, 3)),),
                                  dynamic_shapes={"tokens": {0: steps, 1: batch}})
    return model, program


@pytest.mark.parametrize("options", [{}, {"zoneout": (0.2, 0.1)}], ids=["plain", "zoneout"])
def test_torch_export_with_dynamic_length_and_batch(options):
    """nn.LSTM specialises the sequence length under torch.export; ours keeps both dynamic,
    and zoneout's eval-mode update (which ONNX export refuses) with them."""
    model, program = export_tagger(**options)
    for shape in ((9, 2), (3, 7), (6, 3)):
        tokens = torch.randint(0, 20, shape)
        for got, want in zip(program.module()(tokens), model(tokens)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_aot_inductor_package_runs_the_exported_model(tmp_path):
    """AOTInductor compiles the exported program (our ops stay calls into the op library) into
    a package that loads and runs without the Python model."""
    model, program = export_tagger()
    path = torch._inductor.aoti_compile_and_package(program,
                                                    package_path=str(tmp_path / "tagger.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    for shape in ((9, 2), (4, 5)):
        tokens = torch.randint(0, 20, shape)
        for got, want in zip(runner(tokens), model(tokens)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
