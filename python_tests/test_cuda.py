"""CUDA: the parity checks of the CPU suite, on the GPU (skipped without one)."""

import pytest
import torch
from torch import nn

import lstm_ext
from conftest import Case, compare, requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]


@pytest.mark.parametrize("kind", ["padded", "unbatched", "packed_sorted", "packed_unsorted"])
@pytest.mark.parametrize("layers,bidirectional,proj_size,bias",
                         [(1, False, 0, True), (2, True, 4, True), (3, False, 4, False)])
def test_fp64_on_gpu_matches_cpu_reference(layers, bidirectional, proj_size, bias, kind):
    torch.manual_seed(0)
    reference = nn.LSTM(5, 7, layers, bias=bias, bidirectional=bidirectional,
                        proj_size=proj_size, dtype=torch.float64)
    ours = lstm_ext.LSTM.from_torch(reference).cuda()
    case = Case(reference, kind)
    expected = case.run(reference)
    actual = case.to("cuda").run(ours)
    compare({k: v.cpu() for k, v in actual.items()}, expected, 1e-10)


def test_gradcheck_on_gpu():
    module = lstm_ext.LSTM(3, 4, 2, bidirectional=True).double().cuda()
    x = torch.randn(4, 2, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: module(x)[0], (x,))


def test_non_default_stream():
    module = lstm_ext.LSTM(16, 32, 2).cuda()
    x = torch.randn(10, 4, 16, device="cuda")
    expected = module(x)[0]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        output = module(x)[0]
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(output, expected)
