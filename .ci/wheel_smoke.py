"""Smoke test of the installed wheel, run by .ci/check_wheel.sh.

    python -I wheel_smoke.py SOURCE_TREE

Run from outside the source tree with ``-I`` (no script directory, no
PYTHONPATH on sys.path), so that ``import convgru_triton`` can only find the
installed package. SOURCE_TREE is a copy of the tracked files the wheel was
built from: its pyproject.toml's package-data patterns say which data files
the installed package must hold.
"""

import fnmatch
import os
import subprocess
import sys
import sysconfig

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    tomllib = None


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def fail(message: str) -> None:
    print(f"wheel smoke test: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def check_import():
    import convgru_triton

    package_dir = os.path.dirname(os.path.abspath(convgru_triton.__file__))
    site = os.path.realpath(sysconfig.get_paths()["purelib"])
    if not _inside(package_dir, site):
        fail(f"convgru_triton imported from {package_dir}, not from this environment's {site}")
    print(f"imported convgru_triton {convgru_triton.__version__} from {package_dir}")
    return convgru_triton, package_dir


def check_modules(convgru_triton) -> None:
    import torch

    torch.manual_seed(0)
    # The eager backend: what runs on the CPU whether Triton is installed or not.
    cell = convgru_triton.ConvGRUCell2d(3, 4, kernel_size=3)
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    h = cell(x)
    h = cell(x, h)
    if h.shape != (2, 4, 5, 6) or not torch.isfinite(h).all():
        fail(f"ConvGRUCell2d: output of shape {tuple(h.shape)}, finite: {bool(torch.isfinite(h).all())}")
    h.square().mean().backward()
    grads = [p.grad for p in cell.parameters()] + [x.grad]
    if any(g is None or not torch.isfinite(g).all() for g in grads):
        fail("ConvGRUCell2d: a parameter or the input has no finite gradient after backward")

    gru = convgru_triton.ConvGRU2d(3, 4, kernel_size=3, num_layers=2, batch_first=True)
    seq = torch.randn(2, 3, 3, 5, 6, requires_grad=True)  # (N, T, C, H, W)
    output, h_n = gru(seq)
    if output.shape != (2, 3, 4, 5, 6) or h_n.shape != (2, 2, 4, 5, 6):
        fail(f"ConvGRU2d: output {tuple(output.shape)}, h_n {tuple(h_n.shape)}")
    (output.square().mean() + h_n.mean()).backward()
    grads = [p.grad for p in gru.parameters()] + [seq.grad]
    if any(g is None or not torch.isfinite(g).all() for g in grads):
        fail("ConvGRU2d: a parameter or the input has no finite gradient after backward")
    print("ConvGRUCell2d and ConvGRU2d: forward and backward on the CPU")


def check_tune_command() -> None:
    scripts = sysconfig.get_paths()["scripts"]
    tune = os.path.join(scripts, "convgru-triton-tune")
    if not os.path.isfile(tune):
        fail(f"the console script convgru-triton-tune is not installed ({tune})")
    result = subprocess.run([tune, "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if result.returncode != 0:
        fail(f"convgru-triton-tune --help exited {result.returncode}:\n{result.stdout}")
    print("convgru-triton-tune --help: exit 0")


def expected_package_data(source_tree: str):
    """Files of the source package that pyproject.toml's package-data patterns
    name, relative to the package directory; py.typed always."""
    expected = {"py.typed"}
    if tomllib is None:
        print("package data: Python < 3.11 has no tomllib; checking py.typed only")
        return expected
    with open(os.path.join(source_tree, "pyproject.toml"), "rb") as f:
        patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["convgru_triton"]
    package_src = os.path.join(source_tree, "convgru_triton")
    for root, _dirs, files in os.walk(package_src):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), package_src).replace(os.sep, "/")
            if any(fnmatch.fnmatchcase(rel, pattern) for pattern in patterns):
                expected.add(rel)
    return expected


def check_package_data(package_dir: str, source_tree: str) -> None:
    expected = expected_package_data(source_tree)
    missing = sorted(rel for rel in expected if not os.path.isfile(os.path.join(package_dir, rel)))
    if missing:
        fail("package data missing from the installed package: " + ", ".join(missing))
    print(f"package data installed: {', '.join(sorted(expected))}")


def main() -> None:
    if len(sys.argv) != 2:
        fail("usage: python -I wheel_smoke.py SOURCE_TREE")
    source_tree = os.path.abspath(sys.argv[1])
    if _inside(os.getcwd(), source_tree):
        fail("run from outside the source tree (it would shadow the installed package)")
    convgru_triton, package_dir = check_import()
    check_package_data(package_dir, source_tree)
    check_modules(convgru_triton)
    check_tune_command()
    print("wheel smoke test: passed")


if __name__ == "__main__":
    main()
