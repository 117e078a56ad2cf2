"""The GPU check's first stage: seconds of the CUDA paths most likely to fault, each checked
against nn.LSTM in fp64 on the CPU, before anything longer runs.

Forward and backward of a 2-layer bidirectional LSTM with a projection, on a PackedSequence and
on a padded batch, in fp32 and bf16 (fp32 module under autocast), then a synchronize. Run it
with CUDA_LAUNCH_BLOCKING=1 (gpu_check.sh does) so that a kernel fault surfaces at the launch
that caused it, with its traceback. Exits non-zero at the first failure.

    python benchmarks/gpu_smoke.py [--device cuda|cpu]
"""

import argparse
import contextlib
import copy
import sys
import time

import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

import lstm_ext

# Relative error bounds against fp64: fp32 sums a few hundred products per output; bf16 rounds
# the inputs and weights to 8 bits of mantissa (the cell state stays fp32).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def relative_error(actual, expected):
    expected = expected.double()
    return ((actual.double().cpu() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def run(module, inputs, packed, device, dtype):
    """Output and every gradient of one forward+backward, as fp64 tensors on the CPU."""
    module.zero_grad(set_to_none=True)
    weight_dtype = next(module.parameters()).dtype
    inputs = [x.detach().to(device, weight_dtype).requires_grad_() for x in inputs]
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    with autocast:
        if packed:
            output, (h_n, c_n) = module(pack_sequence(inputs, enforce_sorted=False))
            output = pad_packed_sequence(output)[0]
        else:
            output, (h_n, c_n) = module(torch.stack(inputs, dim=1))
    loss = output.float().square().sum() + h_n.float().sum() + c_n.float().sum()
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    grads = [x.grad for x in inputs] + [p.grad for p in module.parameters()]
    return [t.detach().double().cpu() for t in [output, h_n, c_n, *grads]]


def check(device, dtype, packed, seed=0):
    generator = torch.Generator().manual_seed(seed)
    reference = nn.LSTM(24, 32, num_layers=2, bidirectional=True, proj_size=16).double()
    for parameter in reference.parameters():
        nn.init.uniform_(parameter, -0.3, 0.3, generator=generator)
    ours = lstm_ext.LSTM(24, 32, num_layers=2, bidirectional=True, proj_size=16)
    ours.load_state_dict(reference.state_dict())
    ours = ours.float().to(device)
    lengths = [9, 7, 7, 3, 1] if packed else [8] * 5
    inputs = [torch.randn(n, 24, generator=generator, dtype=torch.float64) for n in lengths]
    if dtype == torch.bfloat16:
        # The reference sees the same rounded data the kernels do.
        inputs = [x.bfloat16().double() for x in inputs]
        reference.load_state_dict({k: v.bfloat16().double()
                                   for k, v in reference.state_dict().items()})
    expected = run(reference, inputs, packed, torch.device("cpu"), torch.float32)
    actual = run(ours, inputs, packed, device, dtype)
    names = ["output", "h_n", "c_n"] + [f"grad x[{i}]" for i in range(len(inputs))] + [
        f"grad {name}" for name, _ in reference.named_parameters()]
    worst = max(zip((relative_error(a, e) for a, e in zip(actual, expected)), names))
    if not all(torch.isfinite(a).all() for a in actual) or worst[0] > TOLERANCE[dtype]:
        raise AssertionError(f"{'packed' if packed else 'padded'} {dtype}: {worst[1]} off by "
                             f"{worst[0]:.2e} relative (bound {TOLERANCE[dtype]:.0e})")
    return worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("smoke: no GPU")
        return 3
    start = time.perf_counter()
    for dtype in (torch.float32, torch.bfloat16):
        for packed in (True, False):
            error, name = check(device, dtype, packed)
            print(f"smoke: {'packed' if packed else 'padded'} {str(dtype)[6:]} forward+backward "
                  f"ok (worst: {name}, {error:.1e} relative)", flush=True)
    print(f"smoke: ok in {time.perf_counter() - start:.1f} s on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'the CPU'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
