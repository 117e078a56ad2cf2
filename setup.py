"""Builds lstm_ext's op library: always the CPU kernels, and csrc/cuda when a CUDA toolkit and a
CUDA build of torch are both present (LSTM_EXT_CUDA=0 turns that off, =1 makes it required).
LSTM_EXT_SANITIZE=address builds the CPU kernels under AddressSanitizer, for tests only."""

import glob
import importlib.util
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def load_toolchain():
    # lstm_ext/_toolchain.py by path: the package itself cannot be imported before it is built.
    spec = importlib.util.spec_from_file_location("_toolchain", ROOT / "lstm_ext" / "_toolchain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toolchain = load_toolchain()
cuda_home = toolchain.find_cuda_home()
if cuda_home:
    # torch.utils.cpp_extension reads CUDA_HOME once, at import.
    os.environ["CUDA_HOME"] = cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    setting = os.environ.get("LSTM_EXT_CUDA", "auto")
    available = cuda_home is not None and torch.version.cuda is not None
    if setting == "0":
        return False
    if setting == "1" and not available:
        sys.exit(
            "LSTM_EXT_CUDA=1 but no CUDA build is possible: "
            f"torch.version.cuda={torch.version.cuda}, CUDA toolkit={cuda_home}"
        )
    return available


def write_build_info(with_cuda):
    # Read by lstm_ext/__init__.py before loading the library, so that a library built against
    # another torch is refused with a clear message instead of an obscure symbol error.
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    (ROOT / "lstm_ext" / "_build_info.py").write_text(
        "# Written by setup.py at build time.\n"
        f"TORCH_VERSION = {torch.__version__!r}\n"
        f"WITH_CUDA = {with_cuda!r}\n"
        f"CUDA_ARCH_LIST = {arch!r}\n"
        f"CUDA_HOME = {cuda_home if with_cuda else None!r}\n"
    )


# LSTM_EXT_SANITIZE=address: a CPU-only build under AddressSanitizer, so that every buffer the
# shared step loop sizes (and the CUDA kernels index the same way) is checked on the CPU
# (.ci/run runs the op and module tests against it).
sanitize = os.environ.get("LSTM_EXT_SANITIZE", "")
if sanitize not in ("", "address"):
    sys.exit(f"LSTM_EXT_SANITIZE={sanitize!r}: only 'address' is supported")
with_cuda = want_cuda() and not sanitize
sources = ["csrc/ops.cpp", "csrc/layer_norm_lstm.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
# C++20 is named explicitly: torch releases before 2.13 default extensions to C++17, and the CPU
# kernels use std::bit_cast. -fno-trapping-math lets the CPU elementwise loops vectorize (see
# csrc/cpu/lstm_cpu.cpp). OpenMP runs the CPU recurrence's parallel region; the library then
# uses the libgomp torch itself loaded (same soname), so both share one thread pool.
cxx_flags = ["-O3", "-std=c++20", "-fno-trapping-math", "-fopenmp"]
extra_link_args = ["-fopenmp"]
if sanitize:
    cxx_flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address", *cxx_flags[1:]]
    extra_link_args = ["-fsanitize=address", "-fopenmp"]
extra_compile_args = {"cxx": cxx_flags}
include_dirs = [str(ROOT / "csrc")]
if with_cuda:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    # The toolkit's headers first; the wheels' only for what the toolkit lacks, after it.
    include_dirs += toolchain.cuda_include_dirs(cuda_home)
    print(f"lstm_ext build: CUDA_HOME {cuda_home}; include folders {include_dirs[1:]}",
          file=sys.stderr)
    extra_compile_args["nvcc"] = ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]
    extension_type = CUDAExtension
else:
    extension_type = CppExtension
write_build_info(with_cuda)

setup(
    packages=find_packages(include=["lstm_ext", "lstm_ext.*"]),
    ext_modules=[
        extension_type(
            "lstm_ext._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
