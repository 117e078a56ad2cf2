"""torch.onnx.export(..., dynamo=True) of models holding lstm_ext.LSTM / LSTMCell, run in
onnxruntime against eager PyTorch: each layer becomes a standard ONNX LSTM node, with dynamic
length and batch. Skipped without the `onnx` extra (pip install .[onnx])."""

import itertools

import pytest
import torch
from torch import nn

import lstm_ext

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install .[onnx])")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


class Wrapper(nn.Module):
    """The LSTM with its initial state as an input or not, returning every output."""

    def __init__(self, lstm, with_state):
        super().__init__()
        self.lstm, self.with_state = lstm, with_state

    def forward(self, x, h0=None, c0=None):
        output, (h_n, c_n) = self.lstm(x, (h0, c0) if self.with_state else None)
        return output, h_n, c_n


def run_onnx(model, inputs, dynamic_shapes, path, other_inputs):
    program = torch.onnx.export(model, tuple(inputs), dynamo=True, dynamic_shapes=dynamic_shapes,
                                verbose=False)
    program.save(str(path))
    graph = onnx.load(str(path)).graph
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return graph, session.run(None, {n: t.numpy() for n, t in zip(names, other_inputs)})


GRID = list(itertools.product([1, 2], [True, False], [False, True], [False, True],
                              [False, True]))


@pytest.mark.parametrize("layers,bias,batch_first,bidirectional,with_state", GRID)
def test_lstm_exports_to_onnx_lstm_nodes_and_matches_eager(tmp_path, layers, bias, batch_first,
                                                           bidirectional, with_state):
    torch.manual_seed(layers * 7 + bidirectional)
    lstm = lstm_ext.LSTM(5, 8, layers, bias=bias, batch_first=batch_first,
                         bidirectional=bidirectional).eval()
    model = Wrapper(lstm, with_state).eval()
    directions = 2 if bidirectional else 1

    def inputs(steps, batch):
        x = torch.randn(batch, steps, 5) if batch_first else torch.randn(steps, batch, 5)
        state = [torch.randn(layers * directions, batch, 8) for _ in range(2)]
        return [x, *state] if with_state else [x]

    steps, batch = torch.export.Dim("steps", min=2), torch.export.Dim("batch", min=2)
    x_dims = {0: batch, 1: steps} if batch_first else {0: steps, 1: batch}
    dynamic = {"x": x_dims, **({"h0": {1: batch}, "c0": {1: batch}} if with_state else {})}
    other = inputs(9, 4)  # another length and batch than the export's example
    graph, outputs = run_onnx(model, inputs(6, 3), dynamic, tmp_path / "lstm.onnx", other)
    assert [node.op_type for node in graph.node].count("LSTM") == layers
    expected = model(*other)
    for got, want in zip(outputs, expected):
        want = want.detach()
        error = (torch.from_numpy(got) - want).abs().max() / want.abs().max()
        assert error <= 1e-5, error


class CellStep(nn.Module):
    """One step of an LSTMCell(5, 8) with its state as inputs."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x, h, c):
        return self.cell(x, (h, c))


def export_cell(cell, path):
    """cell exported with a dynamic batch and run in onnxruntime on a batch of 6: (the graph's
    op types, onnxruntime's outputs, eager's)."""
    batch = torch.export.Dim("batch", min=2)
    inputs = [torch.randn(3, 5), torch.randn(3, 8), torch.randn(3, 8)]
    other = [torch.randn(6, 5), torch.randn(6, 8), torch.randn(6, 8)]
    graph, outputs = run_onnx(CellStep(cell), inputs, {"x": {0: batch}, "h": {0: batch},
                                                       "c": {0: batch}}, path, other)
    return [node.op_type for node in graph.node], outputs, cell(other[0], (other[1], other[2]))


def test_lstmcell_exports_as_one_step_of_an_onnx_lstm(tmp_path):
    torch.manual_seed(3)
    op_types, outputs, expected = export_cell(lstm_ext.LSTMCell(5, 8).eval(),
                                              tmp_path / "cell.onnx")
    assert op_types.count("LSTM") == 1
    for got, want in zip(outputs, expected):
        torch.testing.assert_close(torch.from_numpy(got), want.detach(), rtol=1e-5, atol=1e-6)


PROJECTION_GRID = list(itertools.product([1, 2], [True, False], [False, True], [False, True]))


@pytest.mark.parametrize("layers,bidirectional,with_state,batch_first", PROJECTION_GRID)
def test_a_projection_exports_as_onnx_scans_and_matches_eager(tmp_path, layers, bidirectional,
                                                              with_state, batch_first):
    """The ONNX LSTM operator has no projection: such a layer becomes one Scan over time per
    direction, still with dynamic length and batch."""
    torch.manual_seed(layers * 5 + bidirectional)
    lstm = lstm_ext.LSTM(5, 8, layers, batch_first=batch_first, bidirectional=bidirectional,
                         proj_size=3).eval()
    model = Wrapper(lstm, with_state).eval()
    directions = 2 if bidirectional else 1

    def inputs(steps, batch):
        x = torch.randn(batch, steps, 5) if batch_first else torch.randn(steps, batch, 5)
        state = [torch.randn(layers * directions, batch, size) for size in (3, 8)]
        return [x, *state] if with_state else [x]

    steps, batch = torch.export.Dim("steps", min=2), torch.export.Dim("batch", min=2)
    x_dims = {0: batch, 1: steps} if batch_first else {0: steps, 1: batch}
    dynamic = {"x": x_dims, **({"h0": {1: batch}, "c0": {1: batch}} if with_state else {})}
    other = inputs(9, 4)
    graph, outputs = run_onnx(model, inputs(6, 3), dynamic, tmp_path / "proj.onnx", other)
    op_types = [node.op_type for node in graph.node]
    assert op_types.count("Scan") == layers * directions and "LSTM" not in op_types
    for got, want in zip(outputs, model(*other)):
        want = want.detach()
        assert got.shape == tuple(want.shape)
        error = (torch.from_numpy(got) - want).abs().max() / want.abs().max()
        assert error <= 1e-5, error


def export_dynamic(model, path):
    """model (taking x (T, B, 5)) exported with dynamic length and batch and run in
    onnxruntime on a (9, 4, 5) input: (the graph's op types, onnxruntime's outputs, eager's)."""
    steps, batch = torch.export.Dim("steps", min=2), torch.export.Dim("batch", min=2)
    other = [torch.randn(9, 4, 5)]
    graph, outputs = run_onnx(model, [torch.randn(6, 3, 5)], {"x": {0: steps, 1: batch}},
                              path, other)
    return [node.op_type for node in graph.node], outputs, model(*other), other


def max_relative_error(got, want):
    want = want.detach()
    return (torch.from_numpy(got) - want).abs().max() / want.abs().max()


@pytest.mark.parametrize("proj_size", [0, 3])
def test_zoneout_exports_as_onnx_scans_of_its_eval_update(tmp_path, proj_size):
    """Zoneout's eval-mode update (c = z c_prev + (1 - z) c~, h likewise) is not the ONNX LSTM
    operator's: the layer becomes Scans, and matches eager eval."""
    torch.manual_seed(2)
    lstm = lstm_ext.LSTM(5, 8, 2, bidirectional=True, proj_size=proj_size,
                         zoneout=(0.3, 0.2)).eval()
    op_types, outputs, expected, other = export_dynamic(
        Wrapper(lstm, with_state=False).eval(), tmp_path / "zoneout.onnx")
    assert op_types.count("Scan") == 4 and "LSTM" not in op_types
    plain = lstm_ext.LSTM(5, 8, 2, bidirectional=True, proj_size=proj_size).eval()
    plain.load_state_dict(lstm.state_dict())
    for got, want, without in zip(outputs, expected, Wrapper(plain, False)(*other)):
        assert max_relative_error(got, want) <= 1e-5
        assert (want - without).abs().max() > 0.05 * want.abs().max()  # zoneout counts


class CellsWrapper(nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        output, (h_n, c_n), cells = self.lstm(x)
        return output, h_n, c_n, cells


def test_the_cell_sequence_exports_as_onnx_scans(tmp_path):
    """return_cell_sequence=True: the last layer's Scans also give c of every step."""
    torch.manual_seed(3)
    lstm = lstm_ext.LSTM(5, 8, 2, bidirectional=True, return_cell_sequence=True).eval()
    op_types, outputs, expected, _ = export_dynamic(CellsWrapper(lstm).eval(),
                                                    tmp_path / "cells.onnx")
    assert op_types.count("LSTM") == 1 and op_types.count("Scan") == 2
    assert len(outputs) == 4 and outputs[3].shape == (9, 4, 16)
    for got, want in zip(outputs, expected):
        assert max_relative_error(got, want) <= 1e-5


@torch.no_grad()
def randomise_norms(module):
    """Moves the LayerNorm gains and biases off 1 and 0, so that the export must carry them."""
    for name, parameter in module.named_parameters():
        if name.startswith("layer_norm_"):
            parameter.add_(torch.randn_like(parameter) * 0.3)


def test_the_layer_norm_lstm_exports_as_onnx_scans(tmp_path):
    """layer_norm=True: Scans with the norms of both products and of c (ONNX's
    LayerNormalization), matching eager with random gains and biases."""
    torch.manual_seed(4)
    lstm = lstm_ext.LSTM(5, 8, 2, bidirectional=True, proj_size=3, layer_norm=True).eval()
    randomise_norms(lstm)
    op_types, outputs, expected, _ = export_dynamic(Wrapper(lstm, with_state=False).eval(),
                                                    tmp_path / "layer_norm.onnx")
    assert op_types.count("Scan") == 4 and "LSTM" not in op_types
    # 5e-5: the CPU row kernels' fast sigmoid and tanh (~3e-7 each) grow to ~2e-5 through two
    # normalised layers; with LSTM_EXT_CPU_RECURRENCE=0 (ATen's math) this is within 1e-5.
    for got, want in zip(outputs, expected):
        assert max_relative_error(got, want) <= 5e-5


def test_the_layer_norm_lstm_with_zoneout_exports_its_eval_update(tmp_path):
    """layer_norm=True with zoneout: Scans with the norms and zoneout's expectation."""
    torch.manual_seed(7)
    lstm = lstm_ext.LSTM(5, 8, 2, bidirectional=True, layer_norm=True,
                         zoneout=(0.3, 0.2)).eval()
    randomise_norms(lstm)
    op_types, outputs, expected, _ = export_dynamic(Wrapper(lstm, with_state=False).eval(),
                                                    tmp_path / "layer_norm_zoneout.onnx")
    assert op_types.count("Scan") == 4 and "LSTM" not in op_types
    for got, want in zip(outputs, expected):
        assert max_relative_error(got, want) <= 5e-5


def test_the_layer_norm_lstm_exports_its_cell_sequence(tmp_path):
    """layer_norm=True with return_cell_sequence=True: the Scans give c of every step too."""
    torch.manual_seed(6)
    lstm = lstm_ext.LSTM(5, 8, 2, bidirectional=True, layer_norm=True,
                         return_cell_sequence=True).eval()
    randomise_norms(lstm)
    op_types, outputs, expected, _ = export_dynamic(CellsWrapper(lstm).eval(),
                                                    tmp_path / "layer_norm_cells.onnx")
    assert op_types.count("Scan") == 4 and "LSTM" not in op_types
    assert len(outputs) == len(expected) == 4
    for got, want in zip(outputs, expected):
        assert max_relative_error(got, want) <= 5e-5


@pytest.mark.parametrize("options", [{"layer_norm": True}, {"zoneout": (0.3, 0.2)},
                                     {"layer_norm": True, "zoneout": (0.3, 0.2)}], ids=str)
def test_variant_cells_export_as_one_step_scans(tmp_path, options):
    """An LSTMCell with layer_norm or zoneout (its eval update) exports as a one-step Scan
    and matches eager eval."""
    torch.manual_seed(5)
    cell = lstm_ext.LSTMCell(5, 8, **options).eval()
    randomise_norms(cell)
    op_types, outputs, expected = export_cell(cell, tmp_path / "cell.onnx")
    assert "Scan" in op_types and "LSTM" not in op_types
    for got, want in zip(outputs, expected):
        assert max_relative_error(got, want) <= 5e-5
