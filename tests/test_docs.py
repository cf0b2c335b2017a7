"""The deployment recipes as written: every ```python block of
docs/deploying.md and of the README's "Deploying" section runs, in order, in
one namespace per page, in a temporary directory."""

import os
import re
import shlex

import pytest

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


def _read(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _blocks(text, language):
    return re.findall(r"```" + language + r"\n(.*?)```", text, flags=re.S)


def _readme_deploying():
    text = _read("README.md")
    assert "\n## Deploying\n" in text, "README.md lost its '## Deploying' section"
    return text.split("\n## Deploying\n", 1)[1].split("\n## ", 1)[0]


def _run(blocks, tmp_path, monkeypatch):
    assert blocks, "no python snippets found"
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"<snippet {i}>", "exec"), namespace)
        except Exception as exc:  # name the snippet that failed
            raise AssertionError(f"snippet {i} failed:\n{code}") from exc
    return namespace


def test_readme_deploying_snippets_run(tmp_path, monkeypatch):
    section = _readme_deploying()
    assert "docs/deploying.md" in section
    _run(_blocks(section, "python"), tmp_path, monkeypatch)


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
    """README links to the reference pages in docs/, and they exist."""
    readme = _read("README.md")
    for page in re.findall(r"\]\((docs/[\w./-]+\.md)", readme):
        assert os.path.isfile(os.path.join(ROOT, page)), page
    for page in ("docs/deploying.md", "docs/errors.md", "docs/benchmarks.md", "docs/tuning.md",
                 "docs/what-runs-where.md"):
        assert f"({page}" in readme, f"README does not link {page}"


def test_py_typed_is_shipped():
    """PEP 561: the package marks itself typed, and the marker is package data."""
    assert os.path.isfile(os.path.join(ROOT, "convgru_triton", "py.typed"))
    pyproject = _read("pyproject.toml")
    section = pyproject.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert '"py.typed"' in section


def test_errors_doc_lists_deployment_errors():
    """The deployment errors tests/test_deploy.py raises have their rows in docs/errors.md."""
    from convgru_triton import ConvGRU2d
    from convgru_triton.ops.conv_gru import _ConvGRUFunctorch

    table = _read("docs/errors.md")
    with pytest.raises(RuntimeError) as script_error:
        ConvGRU2d(2, 2, 3).__prepare_scriptable__()
    head, tail = str(script_error.value).split(" (", 1)
    assert f"`{head} (...). {tail.split('). ', 1)[1]}`" in table
    with pytest.raises(NotImplementedError) as jvp_error:
        _ConvGRUFunctorch.jvp(None)
    assert f"`{jvp_error.value}`" in table
    assert "`Expected 3 elements in a list but found 4`" in table
