"""The documentation as written.

* Every ```python block of README.md runs alone, as a user pastes it into a
  fresh interpreter: each in its own subprocess, in an empty temporary
  directory that it must leave empty (on CPU here; written for CUDA too, where
  a GPU runs them).
* Every ```python block of each docs/ page that says "Every Python snippet on
  this page runs" runs the same way, one namespace per page. A docs page with
  Python blocks that makes no such claim is CUDA-only (run where there is a
  GPU) or listed in NOT_RUN with the reason.
* The README links every docs page, every relative link resolves, and the
  README's install and test commands are the ones CI runs (.ci/run).
"""

import glob
import os
import re
import shlex

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("onnxruntime", reason="the deployment recipes need onnxruntime (pip install -e '.[test]')")
pytest.importorskip("onnxscript", reason="the deployment recipes need onnxscript (pip install -e '.[test]')")
# The TorchScript-based exporter and torch.jit announce their deprecation;
# the recipes use them on purpose.
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The feature will be removed:DeprecationWarning"),
]

# What a docs page says when its snippets run (the tests below hold it to that).
RUN_CLAIM = "Every Python snippet on this page runs"
# Pages whose Python blocks need CUDA: run where there is a GPU, skipped on CPU.
CUDA_ONLY = {"docs/cuda-graphs.md"}
# Pages with Python blocks that are not run, and why.
NOT_RUN = {
    "docs/converting.md": "written for RAFT's own files (needs RAFT's code and checkpoint); "
                          "tests/test_convert.py runs the same conversions against RAFT's modules",
    "docs/distributed.md": "a torchrun sketch (several processes, the user's model and data); "
                           "tests/test_ddp.py runs DDP and FSDP2 on 2 CPU processes",
    "docs/errors.md": "switches on global determinism settings (torch.use_deterministic_algorithms) for "
                      "the whole process; tests/test_reproducibility.py covers that mode",
}


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _blocks(text, language):
    return re.findall(r"```" + language + r"\n(.*?)```", text, flags=re.S)


def _docs_pages():
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _claimed_pages():
    return [p for p in _docs_pages() if RUN_CLAIM in _read(p)]


def _section(text, title):
    assert f"\n## {title}\n" in text, f"README.md lost its '## {title}' section"
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def _run(blocks, tmp_path, monkeypatch):
    assert blocks, "no python snippets found"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    torch.manual_seed(0)
    torch._dynamo.reset()
    try:
        for i, code in enumerate(blocks):
            try:
                exec(compile(code, f"<snippet {i}>", "exec"), namespace)
            except Exception as exc:  # name the snippet that failed
                raise AssertionError(f"snippet {i} failed:\n{code}") from exc
    finally:
        torch._dynamo.reset()
    return namespace


DEVICE_LINE = 'device = "cuda" if torch.cuda.is_available() else "cpu"'
README_BLOCKS = _blocks(_read("README.md"), "python")


def test_readme_blocks_are_written_for_every_device():
    """Written for CPU and CUDA alike: a block that uses ``device`` chooses it
    itself, and no block assumes one; every fence is python (run below), text
    or a shell command, so that no untested code hides in another fence."""
    text = _read("README.md")
    assert len(README_BLOCKS) >= 6, "the README lost snippets"
    for i, block in enumerate(README_BLOCKS):
        uses_device = re.search(r"\bdevice\b", block.replace(DEVICE_LINE, "")) is not None
        assert not uses_device or DEVICE_LINE in block, f"README block {i} uses `device` without choosing it"
        assert not re.search(r"""["']cuda["']|\.cuda\(""", block.replace(DEVICE_LINE, "")), \
            f"README block {i} assumes CUDA"
    fences = re.findall(r"^```(\w*)$", text, flags=re.M)
    assert set(fences[0::2]) <= {"python", "bash", "text"}, fences


def _readme_block_params():
    """One parameter per README block; the ones that export to ONNX or compile
    with Inductor are in the slow tier (tens of seconds each on two cores)."""
    params = []
    for i, block in enumerate(README_BLOCKS):
        slow = "torch.onnx.export" in block or "torch.compile" in block
        params.append(pytest.param(i, id=f"block{i}", marks=[pytest.mark.slow] if slow else []))
    return params


@pytest.mark.parametrize("index", _readme_block_params())
def test_readme_block_runs_alone(index, tmp_path):
    """Each ```python block of the README, pasted alone into a fresh interpreter
    (a subprocess, with the environment of a user: no TRITON_INTERPRET), in an
    empty folder, which it leaves empty: a block writes only to a temporary
    directory of its own."""
    import subprocess
    import sys

    code = README_BLOCKS[index]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # One thread, as every test in this suite (conftest.py): CI runs two passes side by side on two cores.
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"README block {index} failed alone:\n{code}\n--- stderr ---\n{proc.stderr[-4000:]}"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert not left, f"README block {index} wrote {left} into the working directory"


def test_readme_deploying_section_links_the_recipes():
    section = _section(_read("README.md"), "Deploying")
    assert "docs/deploying.md" in section and _blocks(section, "python")


def test_every_docs_snippet_is_run_or_says_why_not():
    """A docs page with ```python blocks claims they run (and they are run
    here), is CUDA-only, or is in NOT_RUN with the reason: exactly one."""
    pages = _docs_pages()
    for page in list(NOT_RUN) + sorted(CUDA_ONLY):
        assert page in pages, f"{page} is listed here but does not exist"
    for page in pages:
        text = _read(page)
        if not _blocks(text, "python"):
            assert RUN_CLAIM not in text, f"{page} claims snippets it does not have"
            assert page not in NOT_RUN and page not in CUDA_ONLY, f"{page} has no Python blocks: unlist it"
            continue
        kinds = (RUN_CLAIM in text) + (page in CUDA_ONLY) + (page in NOT_RUN)
        assert kinds == 1, f"{page}: its Python blocks must be claimed to run, CUDA-only or in NOT_RUN"
    assert {"docs/deploying.md", "docs/modules.md"} <= set(_claimed_pages())


@pytest.mark.parametrize("page", [p for p in _claimed_pages() if p != "docs/deploying.md"])
def test_docs_snippets_run(page, tmp_path, monkeypatch):
    _run(_blocks(_read(page), "python"), tmp_path, monkeypatch)


@pytest.mark.parametrize("page", sorted(CUDA_ONLY))
def test_docs_cuda_snippets_run(page, tmp_path, monkeypatch):
    blocks = _blocks(_read(page), "python")
    for i, code in enumerate(blocks):
        compile(code, f"<{page} snippet {i}>", "exec")  # valid Python on every machine
    if not torch.cuda.is_available():
        pytest.skip(f"{page}: the recipe needs a CUDA device")
    _run(blocks, tmp_path, monkeypatch)


@pytest.mark.slow
def test_docs_deploying_snippets_run(tmp_path, monkeypatch):
    text = _read("docs/deploying.md")
    namespace = _run(_blocks(text, "python"), tmp_path, monkeypatch)
    # The TensorRT command (not run: no TensorRT here) reads a file the
    # snippets wrote, and gives shapes of the exported input's rank.
    (command,) = _blocks(text, "console")
    args = shlex.split(command.replace("\\\n", " "))
    assert args[0] == "trtexec"
    onnx_file = next(a.split("=", 1)[1] for a in args if a.startswith("--onnx="))
    assert (tmp_path / onnx_file).is_file()
    import onnx

    graph_input = onnx.load(str(tmp_path / onnx_file)).graph.input[0]
    rank = len(graph_input.type.tensor_type.shape.dim)
    for flag in ("--minShapes=", "--optShapes=", "--maxShapes="):
        spec = next(a.split("=", 1)[1] for a in args if a.startswith(flag))
        name, dims = spec.split(":")
        assert name == graph_input.name and len(dims.split("x")) == rank
    assert namespace["teraflops"] > 0


def test_docs_links_exist():
    """README links every docs page, and every relative link of the README and
    of the docs pages resolves."""
    readme = _read("README.md")
    for page in _docs_pages():
        assert f"]({page}" in readme, f"README does not link {page}"
    for page in ["README.md"] + _docs_pages():
        base = os.path.dirname(os.path.join(ROOT, page))
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)\s]*)?\)", _read(page)):
            if "://" not in target:
                assert os.path.exists(os.path.join(base, target)), f"{page} links {target}, which does not exist"


def test_readme_commands_are_what_ci_runs():
    """.ci/run installs and tests with the README's commands."""
    readme = _read("README.md")
    ci = _read(os.path.join(".ci", "run")).splitlines()
    install = [line.split("#")[0].strip() for line in _blocks(_section(readme, "Install"), "bash")[0].splitlines()]
    assert 'pip install "torch==2.13.0" -e ".[dev]"' in install and 'pip install "torch==2.13.0" -e ".[dev]"' in ci
    commands = [line.split("#")[0].strip() for line in _blocks(_section(readme, "Run the tests"), "bash")[0].splitlines()]
    commands = [c for c in commands if c]
    assert commands[:2] == ["python -m pytest", "python -m pytest -m slow"], commands
    for command in commands:
        assert command in ci, f"the README's test command {command!r} is not what .ci/run runs"


def test_ci_runs_every_tier():
    """pyproject.toml deselects the slow tier by default; .ci/run runs the
    default tier, the slow tier, and the second pass with both."""
    tomllib = pytest.importorskip("tomllib", reason="reads pyproject.toml with tomllib (Python >= 3.11)")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        ini = tomllib.load(f)["tool"]["pytest"]["ini_options"]
    assert ini["addopts"] == ["-m", "not slow"]
    assert any(m.startswith("slow:") for m in ini["markers"])
    ci = _read(os.path.join(".ci", "run"))
    assert '-m "slow or not slow"' in ci, "the second pass must run every test"


def test_py_typed_is_shipped():
    """PEP 561: the package marks itself typed, and the marker is package data."""
    assert os.path.isfile(os.path.join(ROOT, "convgru_triton", "py.typed"))
    pyproject = _read("pyproject.toml")
    section = pyproject.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert '"py.typed"' in section


def test_errors_doc_lists_deployment_errors():
    """The deployment errors tests/test_deploy.py raises have their rows in docs/errors.md."""
    from convgru_triton import ConvGRU2d
    from convgru_triton.ops.sequence.op import _ConvGRUFunctorch

    table = _read("docs/errors.md")
    with pytest.raises(RuntimeError) as script_error:
        ConvGRU2d(2, 2, 3).__prepare_scriptable__()
    head, tail = str(script_error.value).split(" (", 1)
    assert f"`{head} (...). {tail.split('). ', 1)[1]}`" in table
    with pytest.raises(NotImplementedError) as jvp_error:
        _ConvGRUFunctorch.jvp(None)
    assert f"`{jvp_error.value}`" in table
    assert "`Expected 3 elements in a list but found 4`" in table


def test_readme_has_no_unfilled_placeholders():
    """Figures the README quotes are filled in: no ``SOMETHING_TIME``-style
    placeholder left from writing it."""
    import re

    left = re.findall(r"\b[A-Z]+_(?:TIME|FIGURE|TODO|TBD)\b", _read("README.md"))
    assert not left, f"README.md still has placeholders: {left}"
