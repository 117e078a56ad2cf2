"""Which CUDA toolchain a build of lstm_ext uses: the toolkit root, and the header folders of
pip's nvidia-* wheels that fill in what the toolkit lacks.

setup.py loads this file by path (the package is not importable before it is built), and
`python lstm_ext/_toolchain.py` prints the same choices, so a build log can say exactly which
nvcc, CUDA_HOME, libcudart and header folders were used.
"""

import glob
import os
import shutil
import sys
from pathlib import Path

HEADER_SUFFIXES = (".h", ".hpp", ".cuh", ".hxx")


def find_cuda_home(environ=os.environ):
    """The toolkit root. torch guesses it from the nvcc on PATH, which lands on the wrong folder
    when nvcc is reached through a link or wrapper script (/usr/local/bin/nvcc), so each
    candidate must hold both nvcc and the CUDA runtime headers."""
    candidates = [environ.get("CUDA_HOME"), environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += sorted(glob.glob("/usr/local/cuda*"), reverse=True)
    for candidate in candidates:
        if candidate and (Path(candidate) / "bin" / "nvcc").exists() and (
            Path(candidate) / "include" / "cuda_runtime.h"
        ).exists():
            return str(Path(candidate).resolve())
    return None


def headers_in(folder):
    """Every header under `folder`, as paths relative to it."""
    folder = Path(folder)
    return {str(p.relative_to(folder)) for p in folder.rglob("*")
            if p.suffix in HEADER_SUFFIXES and p.is_file()}


def wheel_include_dirs(toolkit_include, site_dirs=None):
    """The nvidia-* wheels' include folders that hold a header the toolkit lacks (ATen's CUDA
    headers include cuBLAS and cuSPARSE, which pip's CUDA torch ships in those wheels), with
    the headers each one adds. They go on the include path after the toolkit's own folder, so
    that where both have a header (the wheels may be another CUDA version), the toolkit's wins.
    """
    toolkit = headers_in(toolkit_include) if toolkit_include else set()
    found = []
    for site in map(Path, sys.path if site_dirs is None else site_dirs):
        for folder in sorted(site.glob("nvidia/*/include")):
            if not folder.is_dir() or str(folder) in (f for f, _ in found):
                continue
            missing = sorted(headers_in(folder) - toolkit)
            if missing:
                found.append((str(folder), missing))
    return found


def cuda_include_dirs(cuda_home, site_dirs=None):
    """The CUDA header folders for a build, in search order: the toolkit's, then the wheels'
    that add headers it lacks."""
    toolkit_include = str(Path(cuda_home) / "include")
    return [toolkit_include] + [folder for folder, _ in wheel_include_dirs(toolkit_include,
                                                                           site_dirs)]


def loaded_libraries(name_part):
    """Paths of the shared libraries this process has mapped whose file name contains
    `name_part` (Linux only; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if name_part in os.path.basename(p))


def describe():
    """The toolchain a build here would use, one fact per line."""
    cuda_home = find_cuda_home()
    lines = [f"nvcc on PATH: {shutil.which('nvcc')}",
             f"CUDA_HOME (as setup.py finds it): {cuda_home}"]
    if cuda_home:
        lines.append(f"nvcc used: {Path(cuda_home) / 'bin' / 'nvcc'}")
        lines.append(f"toolkit headers (first): {Path(cuda_home) / 'include'}")
        for folder, missing in wheel_include_dirs(Path(cuda_home) / "include"):
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more"
                                               if len(missing) > 4 else "")
            lines.append(f"wheel headers (after, for {shown}): {folder}")
    try:
        import torch

        lines.append(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}")
        lines += [f"libcudart loaded by torch: {path}" for path in loaded_libraries("libcudart")]
    except ImportError as error:
        lines.append(f"torch: not importable ({error})")
    return lines


if __name__ == "__main__":
    print("\n".join(describe()))
