"""torch.compile(fullgraph=True): no graph break, compiled equals eager (forward and a training
step), and inter-layer dropout is really applied under compile."""

import pytest
import torch
from torch import nn

import lstm_ext
from lstm_ext import ops


class TinyLanguageModel(nn.Module):
    def __init__(self, lstm_class, vocab=11, embedding=8, hidden=16):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding)
        self.lstm = lstm_class(embedding, hidden, num_layers=2, dropout=0.25, batch_first=True,
                               bidirectional=True, proj_size=6)
        self.decoder = nn.Linear(12, vocab)

    def forward(self, tokens, state=None):
        output, state = self.lstm(self.embedding(tokens), state)
        return self.decoder(output), state


def fresh_model():
    torch.manual_seed(0)
    return TinyLanguageModel(lstm_ext.LSTM).double().eval()


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_forward_compiles_without_graph_break(backend):
    model = fresh_model()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    tokens = torch.randint(0, 11, (3, 7))
    with torch.no_grad():
        expected_logits, (expected_h, expected_c) = model(tokens)
        logits, (h, c) = compiled(tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, expected_h, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(c, expected_c, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_training_step_compiled_equals_eager(backend, monkeypatch):
    # The compiled backward must run the fused backward op, never the double-backward path.
    def refuse(*args, **kwargs):
        raise AssertionError("reference path traced into the compiled backward")

    monkeypatch.setattr(ops, "reference_layer_forward", refuse)
    tokens = torch.randint(0, 11, (3, 7))
    targets = torch.randint(0, 11, (3, 7))

    def step(model, forward):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        logits, (h, c) = forward(tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1))
        loss = loss + h.pow(2).mean() + c.pow(2).mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        return loss.detach(), grads

    eager_model, compiled_model = fresh_model(), fresh_model()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    eager_loss, eager_grads = step(eager_model, eager_model)
    compiled_loss, compiled_grads = step(compiled_model, compiled)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-10, atol=1e-10)
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-9,
                                   atol=1e-10, msg=name)
    for (name, a), b in zip(eager_model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_dropout_is_applied_under_compile():
    """nn.LSTM under compile drops inter-layer dropout silently; ours keeps it. With p = 1 the
    second layer sees zeros, which makes the expected training output exact."""
    torch.manual_seed(0)
    model = lstm_ext.LSTM(4, 8, num_layers=2, dropout=1.0).double().train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 3, 4, dtype=torch.double)
    train_output, _ = compiled(x)
    second_layer_on_zeros = lstm_ext.LSTM(8, 8).double()
    second_layer_on_zeros.weight_ih_l0.data = model.weight_ih_l1.data
    second_layer_on_zeros.weight_hh_l0.data = model.weight_hh_l1.data
    second_layer_on_zeros.bias_ih_l0.data = model.bias_ih_l1.data
    second_layer_on_zeros.bias_hh_l0.data = model.bias_hh_l1.data
    expected, _ = second_layer_on_zeros(torch.zeros(5, 3, 8, dtype=torch.double))
    torch.testing.assert_close(train_output, expected)
    model.eval()
    eval_output, _ = compiled(x)
    assert (eval_output - train_output).abs().max() > 1e-3

    model.dropout = 0.5
    model.train()
    partly = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.manual_seed(7)
    first, _ = partly(x)
    torch.manual_seed(7)
    again, _ = partly(x)
    torch.manual_seed(8)
    other, _ = partly(x)
    torch.testing.assert_close(first, again)
    assert (first - other).abs().max() > 1e-6


def test_packed_sequence_compiles():
    model = lstm_ext.LSTM(4, 6, num_layers=2, bidirectional=True).double()
    sequences = [torch.randn(n, 4, dtype=torch.double) for n in (5, 3, 1)]
    packed = torch.nn.utils.rnn.pack_sequence(sequences)
    compiled = torch.compile(model, backend="aot_eager")
    expected, (expected_h, _) = model(packed)
    output, (h, _) = compiled(packed)
    torch.testing.assert_close(output.data, expected.data)
    torch.testing.assert_close(h, expected_h)


@pytest.mark.parametrize("kind", ["LSTM", "LayerNorm LSTM", "LSTMCell"])
def test_backward_under_compiled_autograd_equals_eager(kind):
    """Compiled autograd traces the backward of the ops' C++ autograd functions: the gradients
    equal eager's (fp64; two layers, bidirectional, for the LSTMs)."""
    torch.manual_seed(7)
    if kind == "LSTMCell":
        module = lstm_ext.LSTMCell(5, 7).double()
        inputs = (torch.randn(3, 5, dtype=torch.float64),
                  (torch.randn(3, 7, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64)))
    else:
        module = lstm_ext.LSTM(5, 7, 2, bidirectional=True, layer_norm=kind != "LSTM").double()
        inputs = (torch.randn(4, 3, 5, dtype=torch.float64),)
    weights = torch.randn(2, dtype=torch.float64)

    def gradients():
        module.zero_grad(set_to_none=True)
        outputs = module(*inputs)
        h, c = outputs if kind == "LSTMCell" else outputs[1]
        loss = weights[0] * h.sin().sum() + weights[1] * c.square().sum()
        if kind != "LSTMCell":
            loss = loss + outputs[0].cos().sum()
        loss.backward()
        return [p.grad.clone() for p in module.parameters()]

    expected = gradients()
    with torch._dynamo.compiled_autograd._enable(torch.compile(backend="aot_eager")):
        actual = gradients()
    for a, b in zip(actual, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
