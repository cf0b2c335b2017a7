"""The tuning registry (convgru_triton._tuning) and the tuner (convgru_triton.tune).

The registry tests run the same on every machine: a fake GPU name stands in
for a CUDA device, which is only a registry key there (no tensor is made on
it). The tuner's tests that run kernels take the ``device`` fixture (compiled
kernels on a GPU, the Triton interpreter on CPU) with an injected timer.
"""

import builtins
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from convgru_triton import _tuning, tune
from convgru_triton._tuning import DEFAULT_CONFIG, KERNELS, LaunchConfig, TuningFileWarning

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_GPU = "fake_gpu_9000"
# Registry keys, not where tensors are made: the registry answers for a CUDA
# device from its files (``_device_key`` is replaced in the registry fixture),
# for any other device with the defaults.
GPU = torch.device("cuda", 0)
NOT_CUDA = torch.device("cpu")
# Compiled kernels (a GPU session, see conftest.py) depend on the number of
# warps and stages as well as the block size; the interpreter only on the latter.
COMPILED_KERNELS = torch.cuda.is_available()


def _doc(entries, **fields):
    doc = {
        "schema": _tuning.SCHEMA_VERSION,
        "device": FAKE_GPU,
        "device_name": "Fake GPU 9000",
        "triton_version": _tuning.triton_version() or "3.0.0",
        "torch_version": torch.__version__,
        "created": "2026-01-01T00:00:00+00:00",
        "entries": entries,
    }
    doc.update(fields)
    return doc


def _entry(block, warps, numel=2**20, kernel="gru_reset_after_fwd", dtype="float32", **fields):
    entry = dict(kernel=kernel, dtype=dtype, numel=numel, block_size=block, num_warps=warps)
    entry.update(fields)
    return entry


class Registry:
    """The three folders of a test, each empty at first; the tuning_dir setting
    points at the first one once a file is written there (or ``use_env()``)."""

    def __init__(self, tmp_path, package_settings):
        self.package_settings = package_settings
        self.env = tmp_path / "env"
        self.cache = tmp_path / "xdg" / "convgru_triton" / "tuning"
        self.shipped = tmp_path / "shipped"
        for folder in (self.env, self.cache, self.shipped):
            folder.mkdir(parents=True)

    def use_env(self):
        self.package_settings(tuning_dir=str(self.env))

    def write(self, folder, doc, name=FAKE_GPU + ".json"):
        if folder == self.env:
            self.use_env()
        path = folder / name
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        return path


@pytest.fixture
def registry(tmp_path, monkeypatch, package_settings, environment_at_import):
    reg = Registry(tmp_path, package_settings)
    # No tuning_dir, the user cache under tmp_path (the settings' listener reads the files again).
    environment_at_import(XDG_CACHE_HOME=str(tmp_path / "xdg"))
    monkeypatch.setattr(_tuning, "SHIPPED_DIR", str(reg.shipped))
    monkeypatch.setattr(_tuning, "_device_key", lambda device: FAKE_GPU if device.type == "cuda" else None)
    _tuning.clear_cache()
    yield reg
    _tuning.clear_cache()


def lookup(kernel="gru_reset_after_fwd", dtype=torch.float32, numel=2**20):
    return _tuning.launch_config(kernel, dtype, numel, GPU)


# ----------------------------------------------------------------------------
# Names, sizes, nearest bucket
# ----------------------------------------------------------------------------


def test_normalize_device_name():
    assert _tuning.normalize_device_name("NVIDIA H100 80GB HBM3") == "nvidia_h100_80gb_hbm3"
    assert _tuning.normalize_device_name("  NVIDIA GeForce RTX 4090 ") == "nvidia_geforce_rtx_4090"
    assert _tuning.normalize_device_name("AMD Instinct MI300X (gfx942)") == "amd_instinct_mi300x_gfx942"
    assert _tuning.normalize_device_name("???") == "unknown_gpu"


def test_size_class():
    assert [_tuning.size_class(n) for n in (1, 2, 3, 4, 5, 1024, 1025, 3000)] == [0, 1, 2, 2, 3, 10, 11, 12]


def test_nearest_bucket(registry):
    entries = [_entry(128, 1, numel=2**16), _entry(512, 2, numel=2**20), _entry(4096, 8, numel=2**24)]
    registry.write(registry.shipped, _doc(entries))
    assert lookup(numel=2**16) == LaunchConfig(128, 1)
    assert lookup(numel=2**16 + 1) == LaunchConfig(128, 1)  # class 17: nearest 16
    assert lookup(numel=2**18) == LaunchConfig(512, 2)  # class 18: a tie of 16 and 20, the larger wins
    assert lookup(numel=3 * 2**19) == LaunchConfig(512, 2)  # class 21
    assert lookup(numel=2**23) == LaunchConfig(4096, 8)  # class 23
    assert lookup(numel=2**30) == LaunchConfig(4096, 8)  # above the ladder
    assert lookup(numel=5) == LaunchConfig(128, 1)  # below it
    # Another kernel or dtype without entries: the defaults.
    assert lookup(kernel="gru_update_bwd") == DEFAULT_CONFIG
    assert lookup(dtype=torch.float16) == _tuning.default_config(torch.float16)


def test_num_stages_read_and_defaulted(registry):
    entries = [_entry(256, 2, num_stages=1), _entry(256, 2, dtype="float16")]
    registry.write(registry.shipped, _doc(entries))
    assert lookup() == LaunchConfig(256, 2, 1)
    assert lookup(dtype=torch.float16) == LaunchConfig(256, 2, _tuning.DEFAULT_NUM_STAGES)


# ----------------------------------------------------------------------------
# Precedence and defaults
# ----------------------------------------------------------------------------


def test_precedence(registry, package_settings):
    env = registry.write(registry.env, _doc([_entry(2048, 8)]))
    cache = registry.write(registry.cache, _doc([_entry(512, 4)]))
    shipped = registry.write(registry.shipped, _doc([_entry(256, 2)]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lookup() == LaunchConfig(2048, 8)
        assert _tuning.explain_config("gru_reset_after_fwd", torch.float32, 2**20, GPU).endswith(str(env))

        env.unlink()
        package_settings(tuning_dir=None)  # a change of the folder reads the files again
        assert lookup() == LaunchConfig(512, 4)
        assert _tuning.explain_config("gru_reset_after_fwd", torch.float32, 2**20, GPU).endswith(str(cache))

        cache.unlink()
        _tuning.clear_cache()
        assert lookup() == LaunchConfig(256, 2)
        assert _tuning.explain_config("gru_reset_after_fwd", torch.float32, 2**20, GPU).endswith(str(shipped))

        shipped.unlink()
        _tuning.clear_cache()
        assert lookup() == DEFAULT_CONFIG
        assert _tuning.explain_config("gru_reset_after_fwd", torch.float32, 2**20, GPU).endswith("defaults")


def test_precedence_is_per_kernel_and_dtype(registry):
    """A file without entries for a (kernel, dtype) leaves it to the next source,
    and sizes of different files are not mixed for one pair."""
    registry.write(registry.env, _doc([_entry(2048, 8, dtype="float16", numel=2**16)]))
    registry.write(registry.cache, _doc([_entry(512, 4, dtype="float16", numel=2**20), _entry(128, 1)]))
    registry.write(registry.shipped, _doc([_entry(256, 2, kernel="gru_update_fwd")]))
    assert lookup(dtype=torch.float16, numel=2**20) == LaunchConfig(2048, 8)  # env, although cache has 2**20
    assert lookup(dtype=torch.float32) == LaunchConfig(128, 1)  # cache
    assert lookup(kernel="gru_update_fwd") == LaunchConfig(256, 2)  # shipped
    assert lookup(kernel="gru_update_bwd") == DEFAULT_CONFIG


def test_defaults_without_files(registry):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no file anywhere is normal: no warning
        for kernel in KERNELS:
            for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
                assert _tuning.launch_config(kernel, dtype, 12345, GPU) == _tuning.default_config(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_defaults_are_sound(dtype):
    cfg = _tuning.default_config(dtype)
    assert _tuning.check_config_values(cfg.block_size, cfg.num_warps, cfg.num_stages) == cfg
    # One 16-byte access per thread and tensor: the widest there is, and no more
    # (more elements per thread cost registers, see DEFAULT_CONFIGS).
    element_size = torch.empty((), dtype=dtype).element_size()
    assert cfg.block_size * element_size == 32 * cfg.num_warps * 16


def test_cpu_device_gets_defaults_without_io(monkeypatch):
    """The interpreter (non-CUDA tensors) never looks at a file or the GPU name."""
    _tuning.clear_cache()

    def no_io(*args, **kwargs):
        raise AssertionError("file access")

    monkeypatch.setattr(builtins, "open", no_io)
    monkeypatch.setattr(os.path, "lexists", no_io)
    monkeypatch.setattr(torch.cuda, "get_device_name", no_io)
    for kernel in KERNELS:
        assert _tuning.launch_config(kernel, torch.float32, 1000, NOT_CUDA) == DEFAULT_CONFIG
    _tuning.clear_cache()


def test_unknown_kernel_is_an_error(registry):
    with pytest.raises(ValueError, match="unknown kernel"):
        lookup(kernel="gru_nonsense")
    with pytest.raises(ValueError, match="unknown kernel"):
        _tuning.launch_config("gru_nonsense", torch.float32, 10, NOT_CUDA)


def test_env_folder_without_file_warns_once(registry):
    registry.use_env()
    with pytest.warns(TuningFileWarning, match="no file for this GPU") as record:
        assert lookup() == DEFAULT_CONFIG
        assert lookup(kernel="gru_update_fwd") == DEFAULT_CONFIG
    assert len([w for w in record if issubclass(w.category, TuningFileWarning)]) == 1
    assert str(registry.env / (FAKE_GPU + ".json")) in str(record[0].message)


# ----------------------------------------------------------------------------
# Broken files: one warning naming the file, then the defaults
# ----------------------------------------------------------------------------

VALID = _doc([_entry(256, 2)])

BROKEN = {
    "empty": "",
    "corrupt-json": '{"schema": 1, "entries": [',
    "not-utf8": b"\xff\xfe\x00garbage".decode("latin-1"),
    "top-level-list": "[]",
    "wrong-schema": _doc([_entry(256, 2)], schema=2),
    "schema-as-bool": _doc([_entry(256, 2)], schema=True),
    "no-entries": {k: v for k, v in VALID.items() if k != "entries"},
    "entries-not-list": _doc({"gru_reset_after_fwd": 1}),
    "entry-not-object": _doc([[256, 2]]),
    "no-triton-version": {k: v for k, v in VALID.items() if k != "triton_version"},
    "bad-triton-version": _doc([_entry(256, 2)], triton_version="main"),
    "stale-triton-version": _doc([_entry(256, 2)], triton_version="2.0.0"),
    "other-gpu": _doc([_entry(256, 2)], device="nvidia_a100_sxm4_40gb"),
    "device-not-normalized": _doc([_entry(256, 2)], device="Fake GPU 9000"),
    "block-not-power-of-two": _doc([_entry(1000, 2)]),
    "block-too-small": _doc([_entry(8, 1)]),
    "block-too-large": _doc([_entry(2**20, 4)]),
    "block-float": _doc([_entry(1024.0, 4)]),
    "block-string": _doc([_entry("1024", 4)]),
    "block-bool": _doc([_entry(True, 4)]),
    "warps-3": _doc([_entry(1024, 3)]),
    "warps-64": _doc([_entry(1024, 64)]),
    "stages-0": _doc([_entry(1024, 4, num_stages=0)]),
    "unknown-kernel": _doc([_entry(1024, 4, kernel="gru_magic")]),
    "unknown-dtype": _doc([_entry(1024, 4, dtype="int8")]),
    "numel-zero": _doc([_entry(1024, 4, numel=0)]),
    "numel-missing": _doc([{k: v for k, v in _entry(1024, 4).items() if k != "numel"}]),
    "time-not-number": _doc([_entry(1024, 4, time_ms="fast")]),
    "duplicate-entry": _doc([_entry(1024, 4), _entry(512, 4)]),
}


@pytest.mark.parametrize("content", list(BROKEN.values()), ids=list(BROKEN))
def test_broken_file_warns_once_and_falls_back(registry, content):
    path = registry.write(registry.env, content if isinstance(content, str) else json.dumps(content))
    with pytest.warns(TuningFileWarning) as record:
        for kernel in KERNELS:
            for numel in (10, 2**20):
                assert _tuning.launch_config(kernel, torch.float32, numel, GPU) == DEFAULT_CONFIG
    ours = [w for w in record if issubclass(w.category, TuningFileWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert str(path) in str(ours[0].message)


def test_broken_file_falls_through_to_the_next_source(registry):
    bad = registry.write(registry.env, "{corrupt")
    registry.write(registry.shipped, VALID)
    with pytest.warns(TuningFileWarning, match="not valid JSON") as record:
        assert lookup() == LaunchConfig(256, 2)
    assert str(bad) in str(record[0].message)


def test_stale_file_names_both_versions(registry):
    path = registry.write(registry.cache, _doc([_entry(256, 2)], triton_version="1.1.0"))
    with pytest.warns(TuningFileWarning, match="stale") as record:
        assert lookup() == DEFAULT_CONFIG
    message = str(record[0].message)
    assert str(path) in message and "1.1.0" in message


def test_same_minor_version_is_not_stale(registry):
    mm = _tuning._major_minor(_tuning.triton_version())
    if mm is None:
        pytest.skip("the installed Triton's version is unknown")
    registry.write(registry.env, _doc([_entry(256, 2)], triton_version=f"{mm[0]}.{mm[1]}.99+local"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lookup() == LaunchConfig(256, 2)


def test_directory_in_place_of_file(registry):
    registry.use_env()
    path = registry.env / (FAKE_GPU + ".json")
    path.mkdir()
    with pytest.warns(TuningFileWarning, match="cannot be read") as record:
        assert lookup() == DEFAULT_CONFIG
    assert str(path) in str(record[0].message)


def test_unreadable_file(registry):
    path = registry.write(registry.env, VALID)
    os.chmod(path, 0)
    try:
        try:
            with open(path, "rb"):
                pytest.skip("permission bits do not stop this user (root) from reading; "
                            "test_directory_in_place_of_file covers an unreadable file")
        except PermissionError:
            pass
        with pytest.warns(TuningFileWarning, match="cannot be read") as record:
            assert lookup() == DEFAULT_CONFIG
        assert str(path) in str(record[0].message)
    finally:
        path.chmod(0o644)


def test_warning_again_after_clear_cache(registry):
    registry.write(registry.env, "{")
    with pytest.warns(TuningFileWarning):
        lookup()
    _tuning.clear_cache()
    with pytest.warns(TuningFileWarning):
        lookup()


# ----------------------------------------------------------------------------
# Caching: no I/O per launch, torch.compile
# ----------------------------------------------------------------------------


def test_no_io_after_first_lookup(registry, monkeypatch):
    registry.write(registry.env, _doc([_entry(128, 1, numel=2**16), _entry(2048, 8, numel=2**24)]))
    assert lookup(numel=2**16) == LaunchConfig(128, 1)

    def no_io(*args, **kwargs):
        raise AssertionError("I/O or parsing in a cached look-up")

    for target, name in ((builtins, "open"), (os.path, "lexists"), (os.path, "exists"), (os, "stat"),
                         (json, "loads"), (json, "load"), (torch.cuda, "get_device_name")):
        monkeypatch.setattr(target, name, no_io)
    for _ in range(100):
        assert lookup(numel=2**16) == LaunchConfig(128, 1)
    # A new size class reuses the parsed file: still no I/O.
    assert lookup(numel=2**24 + 1) == LaunchConfig(2048, 8)
    assert lookup(numel=2**16 - 7) == LaunchConfig(128, 1)


def test_lookup_is_fast_when_cached(registry):
    import time

    registry.write(registry.shipped, VALID)
    lookup()
    start = time.perf_counter()
    for _ in range(10000):
        lookup()
    per_call = (time.perf_counter() - start) / 10000
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} us per cached look-up"


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_torch_compile_traces_the_lookup(registry, dynamic, device):
    """fullgraph: the first look-up (which reads a file) happens while Dynamo traces."""
    torch._dynamo.reset()
    registry.write(registry.shipped, _doc([_entry(128, 1, numel=2**6), _entry(2048, 8, numel=2**12)]))

    def fn(x):
        cfg = _tuning.launch_config("gru_reset_after_fwd", x.dtype, x.numel(), GPU)
        return x * cfg.block_size + cfg.num_warps

    compiled = torch.compile(fn, fullgraph=True, backend="eager", dynamic=dynamic)
    for numel, cfg in ((64, LaunchConfig(128, 1)), (4096, LaunchConfig(2048, 8)), (4000, LaunchConfig(2048, 8))):
        x = torch.randn(numel, device=device)
        torch.testing.assert_close(compiled(x), x * cfg.block_size + cfg.num_warps)
        torch.testing.assert_close(fn(x), x * cfg.block_size + cfg.num_warps)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------
# Forced configurations
# ----------------------------------------------------------------------------


def test_forced_config(registry):
    registry.write(registry.shipped, VALID)
    forced = LaunchConfig(4096, 16, 2)
    with _tuning.forced_config(forced):
        assert lookup() == forced
        assert _tuning.launch_config("gru_update_bwd", torch.float16, 7, NOT_CUDA) == forced
        with _tuning.forced_config(LaunchConfig(128, 1)):
            assert lookup() == LaunchConfig(128, 1)
        assert lookup() == forced
    assert lookup() == LaunchConfig(256, 2)
    with pytest.raises(RuntimeError):
        with _tuning.forced_config(forced):
            raise RuntimeError("boom")
    assert lookup() == LaunchConfig(256, 2)
    with pytest.raises(TypeError):
        with _tuning.forced_config((1024, 4)):
            pass


# ----------------------------------------------------------------------------
# The tuning file the tuner writes
# ----------------------------------------------------------------------------


def _result(kernel, dtype, numel, *timed):
    r = tune.Result(kernel, dtype, numel, tune.ELEMENTS_MOVED[kernel] * numel * 4)
    r.trials = [tune.Trial(cfg, ms) for cfg, ms in timed]
    return r


def test_document_round_trip(registry):
    results = [
        _result("gru_reset_after_fwd", torch.float32, 2**16, (LaunchConfig(256, 2), 0.5), (DEFAULT_CONFIG, 0.7)),
        _result("gru_reset_after_fwd", torch.float32, 2**20, (LaunchConfig(2048, 8), 0.5), (DEFAULT_CONFIG, 0.9)),
        _result("gru_update_bwd", torch.float16, 2**16, (LaunchConfig(512, 4, 1), 0.5)),
        _result("gru_update_fwd", torch.float16, 2**16, (LaunchConfig(512, 4), None)),  # nothing ran: no entry
    ]
    doc = tune.make_document(results, "Fake GPU 9000")
    assert doc["device"] == FAKE_GPU and doc["device_name"] == "Fake GPU 9000"
    assert len(doc["entries"]) == 3
    entry = doc["entries"][0]
    assert entry["gb_per_s"] == pytest.approx(12 * 2**16 * 4 / 0.5e-3 / 1e9, abs=0.05)
    tune.write_atomic(str(registry.cache / (FAKE_GPU + ".json")), doc)
    assert lookup(numel=2**16) == LaunchConfig(256, 2)
    assert lookup(numel=2**21) == LaunchConfig(2048, 8)
    assert lookup(kernel="gru_update_bwd", dtype=torch.float16) == LaunchConfig(512, 4, 1)
    assert lookup(kernel="gru_update_fwd", dtype=torch.float16) == _tuning.default_config(torch.float16)


def test_document_keeps_entries_it_did_not_retune():
    old = tune.make_document(
        [_result("gru_reset_after_fwd", torch.float32, 2**16, (LaunchConfig(256, 2), 1.0)),
         _result("gru_reset_after_fwd", torch.float16, 2**16, (LaunchConfig(256, 2), 1.0))],
        "Fake GPU 9000",
    )
    new = tune.make_document(
        [_result("gru_reset_after_fwd", torch.float16, 2**16, (LaunchConfig(4096, 16), 1.0))], "Fake GPU 9000", old
    )
    got = {(e["dtype"], e["block_size"]) for e in new["entries"]}
    assert got == {("float32", 256), ("float16", 4096)}
    # An existing file of another GPU or Triton version is not merged.
    stale = dict(old, triton_version="1.0.0")
    assert len(tune.make_document([], "Fake GPU 9000", stale)["entries"]) == 0
    assert len(tune.make_document([], "Other GPU", old)["entries"]) == 0


def test_atomic_write(tmp_path):
    path = tmp_path / "sub" / "gpu.json"
    tune.write_atomic(str(path), {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    tune.write_atomic(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(path.parent) == ["gpu.json"]


@pytest.mark.parametrize("where", ["json.dump", "os.replace", "os.fsync"])
def test_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch, where):
    path = tmp_path / "gpu.json"
    path.write_text('{"old": true}')

    def interrupted(*args, **kwargs):
        if where == "json.dump":  # half a file written, then the interruption
            args[1].write('{"new": ')
        raise KeyboardInterrupt

    module, name = where.split(".")
    monkeypatch.setattr({"json": json, "os": os}[module], name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune.write_atomic(str(path), {"new": True})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["gpu.json"]  # no temporary file left behind


# ----------------------------------------------------------------------------
# The tuner's search loop
# ----------------------------------------------------------------------------


def _fake_case(device, run=None, check=None):
    return tune.Case("gru_update_fwd", torch.float32, 1024, device,
                     run=run or (lambda: "out"), check=check or (lambda out: None))


def test_search_picks_the_fastest_and_skips_failures(device):
    times = {128: 3.0, 256: 1.5, 512: 0.5, 1024: 2.0, 2048: 0.1, 4096: 0.2}
    seen = []

    def active():  # what a launcher would get from the registry right now
        return _tuning.launch_config("gru_update_fwd", torch.float32, 1024, device)

    def run():
        cfg = active()
        if cfg.block_size == 512:
            raise RuntimeError("out of resources: shared memory")
        return cfg

    def check(out):
        return "h': differs" if out.block_size == 2048 else None

    def timer(fn):
        cfg = active()
        seen.append(cfg.block_size)
        if cfg.block_size == 4096:
            raise RuntimeError("illegal instruction")
        return times[cfg.block_size]

    candidates = [LaunchConfig(b, 4) for b in times]
    # float16: its default configuration is (1024, 4 warps), one of the candidates.
    result = tune.Result("gru_update_fwd", torch.float16, 1024, 6 * 1024 * 2)
    result.trials = tune.search(_fake_case(device, run, check), candidates, timer)
    assert result.best.config == LaunchConfig(256, 4)
    assert seen == [128, 256, 1024, 4096]  # neither the failing nor the wrong candidate is timed
    skipped = {t.config.block_size: t.skipped for t in result.trials if t.skipped}
    assert set(skipped) == {512, 2048, 4096}
    assert "out of resources" in skipped[512] and "wrong result" in skipped[2048] and "timing" in skipped[4096]
    assert result.default.ms == 2.0
    table = tune.format_table([result])
    assert "1.33x" in table  # the default (1024, 4 warps) took 2.0 ms, the best 1.5 ms
    assert _tuning._FORCED is None  # nothing left forced


def test_search_with_nothing_that_runs(device):
    def run():
        raise RuntimeError("compilation failed")

    trials = tune.search(_fake_case(device, run), [LaunchConfig(128, 4), LaunchConfig(256, 4)], lambda fn: 1.0)
    result = tune.Result("gru_update_fwd", torch.float32, 1024, 1)
    result.trials = trials
    assert result.best is None and all("compilation failed" in t.skipped for t in trials)
    assert tune.make_document([result], "Fake GPU 9000")["entries"] == []


def test_candidates_and_ladder():
    cands = tune.candidate_configs()
    assert DEFAULT_CONFIG in cands
    for c in cands:
        assert 1 <= c.block_size // (32 * c.num_warps) <= tune.MAX_ELEMENTS_PER_THREAD
    assert {c.block_size for c in cands} == set(tune.DEFAULT_BLOCK_SIZES)
    assert tune.size_ladder(2**16, 2**28) == [2**e for e in range(16, 29, 2)]
    assert tune.size_ladder(2**16, 2**21) == [2**16, 2**18, 2**20, 2**21]
    assert tune.size_ladder(1000, 1000) == [1024]
    assert tune.parse_size("2^20") == tune.parse_size("2**20") == tune.parse_size("1048576") == 2**20


@pytest.mark.triton_kernels
def test_tune_end_to_end(device):
    """The real cases (inputs, launchers, reference checks) with an injected timer."""
    candidates = [LaunchConfig(128, 4), LaunchConfig(1024, 4)]

    def timer(fn):  # pretend the small block is faster
        active = _tuning.launch_config(KERNELS[0], torch.float32, 1, device)
        return {128: 1.0, 1024: 2.0}[active.block_size]

    results = tune.tune(KERNELS, [torch.float32], [2**10], candidates, device, timer, progress=False)
    assert [r.kernel for r in results] == list(KERNELS)
    for r in results:
        assert [t.skipped for t in r.trials] == [None, None], r.kernel
        assert r.best.config == LaunchConfig(128, 4)
    doc = tune.make_document(results, "Fake GPU 9000")
    assert len(doc["entries"]) == len(KERNELS)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("kernel", KERNELS)
def test_case_check_catches_wrong_and_unwritten_outputs(kernel, device):
    case = tune.build_case(kernel, torch.float32, 2**8, device)
    case.reset()
    out = case.run()
    assert case.check(out) is None
    tensors = [t for t in _flatten(out) if isinstance(t, torch.Tensor)]
    # Corrupt the first output: the check must notice.
    tensors[0].view(-1)[3] += 0.5
    assert case.check(out) is not None
    tensors[0].view(-1)[3] = float("nan")
    assert "not finite" in case.check(out)


def _flatten(out):
    if isinstance(out, (tuple, list)):
        for o in out:
            yield from _flatten(o)
    else:
        yield out


# ----------------------------------------------------------------------------
# Kernels run correctly with every configuration they can be given
# ----------------------------------------------------------------------------


def _shipped_configs():
    configs = set()
    folder = os.path.join(os.path.dirname(_tuning.__file__), "tuning_configs")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                doc = json.load(f)
            table = _tuning.parse_document(doc, name[: -len(".json")])  # valid, and named after its GPU
            configs.update(cfg for rows in table.values() for _, cfg in rows)
    return configs


def test_shipped_files_are_valid():
    _shipped_configs()


def _all_configs():
    configs = set(_tuning.DEFAULT_CONFIGS.values()) | _shipped_configs() | set(tune.candidate_configs())
    if COMPILED_KERNELS:  # each its own compiled kernel
        return sorted(configs, key=lambda c: (c.block_size, c.num_warps, c.num_stages))
    # Under the interpreter only the block size changes what runs: one config per block size.
    by_block = {}
    for cfg in sorted(configs, key=lambda c: (c.block_size, c.num_warps, c.num_stages)):
        by_block.setdefault(cfg.block_size, cfg)
    return sorted(by_block.values(), key=lambda c: c.block_size)


@pytest.mark.triton_kernels
@pytest.mark.parametrize("cfg", [pytest.param(c, marks=[pytest.mark.slow] if c.block_size >= 512 else [])
                                 for c in _all_configs()], ids=str)
def test_kernels_correct_with_config(cfg, device):
    """Every kernel against its reference with ``cfg``, on planes of 1.5 blocks
    (3 channels x S, which no block size divides), two samples."""
    spatial = cfg.block_size // 2 + 1
    for kernel in KERNELS:
        case = tune.build_case(kernel, torch.float32, 2 * 3 * spatial, device, shape=(2, 3, spatial))
        trials = tune.search(case, [cfg], timer=lambda fn: 1.0)
        assert trials[0].skipped is None, f"{kernel} with {cfg}: {trials[0].skipped}"


# ----------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------


def _run_command(*args, env=None):
    full_env = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
    full_env.pop("TRITON_INTERPRET", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "convgru_triton.tune", *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=300)


@pytest.mark.slow
def test_command_without_gpu_fails_clearly():
    proc = _run_command()
    assert proc.returncode == 2, proc.stderr
    assert "no CUDA GPU" in proc.stderr and "--dry-run" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_command_dry_run(tmp_path):
    proc = _run_command("--dry-run", "--dtypes", "float16", "--max-size", "2^20", env={_tuning.ENV_DIR: str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for kernel in KERNELS:
        assert kernel in out
    assert "2^16, 2^18, 2^20" in out and "float16" in out
    assert f"would write: {tmp_path}" in out
    assert os.listdir(tmp_path) == []  # a dry run writes nothing


def test_command_rejects_bad_arguments(capsys):
    for args in (["--kernels", "gru_magic"], ["--dtypes", "int8"], ["--max-size", "lots"],
                 ["--min-size", "2^20", "--max-size", "2^16"], ["--block-sizes", "1000"], ["--num-warps", "64"]):
        with pytest.raises(SystemExit) as exc:
            tune.main(["--dry-run", *args])
        assert exc.value.code == 2, args
        assert "error" in capsys.readouterr().err


def test_command_writes_the_file_the_registry_then_uses(registry, monkeypatch, environment_at_import, capsys):
    """A new card: one command, then the package uses its file (GPU calls faked)."""
    environment_at_import(TRITON_INTERPRET="0")  # checked by main(); the kernels are imported already
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 9000")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    calls = []

    def fake_tune(kernels, dtypes, sizes, candidates, device, timer, progress=True):
        calls.append((tuple(kernels), tuple(dtypes), tuple(sizes), device))
        return [_result(k, d, s, (candidates[-1], 0.25), (candidates[0], 0.5))
                for d in dtypes for k in kernels for s in sizes]

    monkeypatch.setattr(tune, "tune", fake_tune)
    assert tune.main(["--kernels", "gru_update_fwd", "--dtypes", "float16,bfloat16", "--max-size", "2^18", "-q"]) == 0
    assert calls == [(("gru_update_fwd",), (torch.float16, torch.bfloat16), (2**16, 2**18), GPU)]
    out = capsys.readouterr().out
    path = registry.cache / (FAKE_GPU + ".json")
    assert f"wrote {path}" in out and "GB/s" in out
    best = tune.candidate_configs()[-1]
    assert lookup(kernel="gru_update_fwd", dtype=torch.float16, numel=2**17) == best
    assert lookup(kernel="gru_update_fwd", dtype=torch.float32) == DEFAULT_CONFIG


def test_command_refuses_to_time_the_interpreter(monkeypatch, environment_at_import, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    environment_at_import(TRITON_INTERPRET="1")
    assert tune.main(["-q"]) == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


@pytest.mark.triton_kernels
def test_tune_skips_sizes_that_do_not_fit(monkeypatch, device):
    monkeypatch.setattr(tune, "_memory_free", lambda device: 2**20)
    results = tune.tune(["gru_update_fwd"], [torch.float32], [2**8, 2**20], [DEFAULT_CONFIG], device,
                        lambda fn: 1.0, progress=False)
    assert [r.numel for r in results] == [2**8]
    assert [t.skipped for t in results[0].trials] == [None]  # the size that fits was tuned


# ----------------------------------------------------------------------------
# The fused step: the path per shape, the fused kernels' tiles, the tuner
# ----------------------------------------------------------------------------


def _path_entry(path, numel=2**20, dtype="bfloat16", reset_after=False, direction="fwd", kernel_size=(3, 3), **f):
    entry = dict(dtype=dtype, reset_after=reset_after, direction=direction, numel=numel, path=path, **f)
    if kernel_size is not None:
        entry["kernel_size"] = list(kernel_size)
    return entry


def _tile_entry(block_m=128, block_n=64, block_k=64, warps=8, stages=3, kernel="conv_rz_fwd", dtype="bfloat16",
                numel=2**20):
    return dict(kernel=kernel, dtype=dtype, numel=numel, block_m=block_m, block_n=block_n, block_k=block_k,
                num_warps=warps, num_stages=stages)


def _step_path(dtype=torch.bfloat16, reset_after=False, direction="fwd", kernel_size=(3, 3), numel=2**20):
    return _tuning.step_path(GPU, dtype, reset_after, direction, kernel_size, numel)


def test_step_path_and_tiles_default_without_files(registry):
    # No figure of the fused step exists: cuDNN + gate kernels; the fused kernels' default tiles.
    assert _tuning.DEFAULT_STEP_PATH == "cudnn"
    assert _step_path() == "cudnn" and _step_path(direction="bwd") == "cudnn"
    assert _tuning.tile_config("conv_rz_fwd", torch.bfloat16, 2**20, GPU) == _tuning.TileConfig(64, 32, 64, 4, 2)
    assert _tuning.tile_config("conv_n_fwd", torch.float32, 2**20, GPU) == _tuning.TileConfig(64, 32, 32, 4, 2)
    # reset_after's kernel: 8 warps (at 4, 255 registers on Triton 3.6: no headroom).
    assert _tuning.tile_config("conv_reset_after_fwd", torch.float16, 9, NOT_CUDA) == _tuning.TileConfig(64, 32, 64, 8, 2)


def test_step_paths_and_tiles_from_a_file(registry):
    registry.write(registry.shipped, _doc(
        [_entry(256, 2)],
        step_paths=[_path_entry("fused", numel=2**20), _path_entry("cudnn", numel=2**26),
                    _path_entry("fused", direction="bwd", kernel_size=None),
                    _path_entry("cudnn", kernel_size=(1, 5))],
        fused_tiles=[_tile_entry(numel=2**20), _tile_entry(block_m=64, numel=2**26)]))
    assert lookup() == LaunchConfig(256, 2)  # the gate kernels' entries are read as before
    assert _step_path(numel=2**19) == "fused"  # nearest size class
    assert _step_path(numel=2**25) == "cudnn"
    assert _step_path(kernel_size=(1, 5)) == "cudnn"  # its own kernel size's entry
    assert _step_path(kernel_size=(5, 1)) == "cudnn"  # no entry for it, none without a kernel size: default
    assert _step_path(direction="bwd", kernel_size=(5, 1)) == "fused"  # an entry for every kernel size
    assert _step_path(reset_after=True) == "cudnn"  # another formulation: default
    assert _step_path(dtype=torch.float16) == "cudnn"
    assert _tuning.tile_config("conv_rz_fwd", torch.bfloat16, 2**20, GPU) == _tuning.TileConfig(128, 64, 64, 8, 3)
    assert _tuning.tile_config("conv_rz_fwd", torch.bfloat16, 2**27, GPU).block_m == 64
    assert _tuning.tile_config("conv_n_fwd", torch.bfloat16, 2**20, GPU) == _tuning.default_tile("conv_n_fwd",
                                                                                              torch.bfloat16)
    # Non-CUDA devices: defaults, no look-up.
    assert _tuning.step_path(NOT_CUDA, torch.bfloat16, False, "fwd", (3, 3), 2**20) == "cudnn"
    with _tuning.forced_step_path("fused"):
        assert _step_path(numel=2**25) == "fused"
    assert _step_path(numel=2**25) == "cudnn"


def test_step_decision_is_cached(registry, monkeypatch):
    registry.write(registry.shipped, _doc([], step_paths=[_path_entry("fused")]))
    assert _step_path() == "fused"
    reads = []
    monkeypatch.setattr(builtins, "open", lambda *a, **k: reads.append(a) or pytest.fail("file access"))
    for _ in range(3):
        assert _step_path(numel=2**20 - 5) == "fused"  # same size class: the cache
        assert _tuning.tile_config("conv_rz_fwd", torch.bfloat16, 2**20, GPU).block_m == 64
    assert reads == []


@pytest.mark.parametrize("bad", [
    dict(step_paths=[_path_entry("fast")]),
    dict(step_paths=[_path_entry("fused", direction="sideways")]),
    dict(step_paths=[_path_entry("fused", kernel_size=(3, 0))]),
    dict(step_paths=[dict(_path_entry("fused"), reset_after=1)]),
    dict(step_paths=[_path_entry("fused"), _path_entry("cudnn")]),  # twice the same key
    dict(step_paths={"path": "fused"}),
    dict(fused_tiles=[_tile_entry(block_m=96)]),
    dict(fused_tiles=[_tile_entry(warps=16)]),
    dict(fused_tiles=[_tile_entry(kernel="conv_magic")]),
    dict(fused_tiles=[_tile_entry(block_k=8)]),
])
def test_bad_fused_sections_skip_the_file_with_a_warning(registry, bad):
    registry.write(registry.env, _doc([_entry(256, 2)], **bad))
    with pytest.warns(TuningFileWarning, match="step_paths|fused_tiles|not using"):
        assert _step_path() == "cudnn"
    assert lookup() == DEFAULT_CONFIG  # the whole file is skipped, as for any schema error


def test_fused_step_mode_values(environment_at_import):
    pytest.importorskip("triton")
    from convgru_triton.ops.fused_step import kernels as fused_step

    for raw, want in ((None, "auto"), ("", "auto"), (" AUTO ", "auto"), ("1", "1"), ("0", "0")):
        assert fused_step.mode(raw if raw is not None else "") == want
    with pytest.raises(ValueError, match=r"fused_step \(CONVGRU_TRITON_FUSED_STEP\) must be one of 'auto', '1', "
                                         r"'0'.*got 'yes'"):
        fused_step.mode("yes")
    environment_at_import(CONVGRU_TRITON_FUSED_STEP="yes")
    with pytest.raises(ValueError, match=r"environment variable CONVGRU_TRITON_FUSED_STEP must be one of 'auto', "
                                         r"'1', '0'.*got 'yes'"):
        fused_step.mode()


@pytest.mark.triton_kernels
def test_fused_step_bad_env_value_raises_at_the_first_call(monkeypatch, environment_at_import, device):
    import convgru_triton as cg
    from convgru_triton.ops.sequence import op as conv_gru

    environment_at_import(CONVGRU_TRITON_FUSED_STEP="true")
    monkeypatch.setattr(conv_gru, "_PLANS", {})
    gru = cg.ConvGRU2d(2, 3, 3, backend="triton").to(device)
    with pytest.raises(ValueError, match="CONVGRU_TRITON_FUSED_STEP must be one of .*got 'true'"):
        gru(torch.randn(2, 1, 2, 4, 5, device=device))


@pytest.mark.triton_kernels
def test_use_fused_follows_mode_and_registry(package_settings, device):
    from convgru_triton._conv import ConvSpec
    from convgru_triton.ops.fused_step import kernels as fused_step

    spec = ConvSpec((3, 3), (1, 1))
    h = torch.zeros(2, 4, 5, 6, device=device)
    package_settings(fused_step="1")
    assert fused_step.use_fused("fwd", False, spec, h) and fused_step.use_fused("bwd", True, spec, h)
    assert not fused_step.use_fused("fwd", False, ConvSpec((3, 3), (1, 1), "reflect"), h)  # supports() is False
    package_settings(fused_step="0")
    assert not fused_step.use_fused("fwd", False, spec, h)
    package_settings(fused_step="auto")
    assert not fused_step.use_fused("fwd", False, spec, h)  # auto: the default, cuDNN + gate kernels
    with _tuning.forced_step_path("fused"):  # as a tuned entry saying "fused" would
        assert fused_step.use_fused("fwd", False, spec, h)
    with pytest.raises(ValueError, match="direction"):
        fused_step.use_fused("sideways", False, spec, h)


def _fake_step_timer(tile_ms, cudnn_ms=1.0):
    """Times by what runs: the cuDNN path (no forced tile) or a tile's BLOCK_M."""
    def timer(fn):
        fn()
        tile = _tuning._FORCED_TILE
        return cudnn_ms if tile is None else tile_ms[tile.block_m]
    return timer


# The slow tier: a tuning run through the interpreter.
@pytest.mark.slow
@pytest.mark.triton_kernels
def test_tune_fused_step_chooses_and_writes(registry, device):
    """Both paths and every tile checked against the reference (NaN-poisoned
    buffers) and timed; the faster path and the best tile are written and
    then read by the registry. Tiny shapes not block multiples, float32; both
    formulations, NCHW for 3x3 and channels_last for 1x5 (~7 s interpreted).
    The choice of cuDNN: test_fused_sections_decide_shared_keys_together."""
    dtype, fused_wins = torch.float32, True
    shapes = (tune.step_shapes([(2, 5, 5, 7, (3, 3))], [], [dtype], [False, True], [False])
              + tune.step_shapes([(2, 5, 5, 7, (1, 5))], [], [dtype], [False, True], [True]))
    tiles = [_tuning.default_tile("conv_rz_fwd", dtype), _tuning.TileConfig(32, 16, 16, 4, 2)]
    timer = _fake_step_timer({64: 2.0, 32: 0.5 if fused_wins else 1.5})
    results = tune.tune_fused_step(shapes, lambda d, direction: tiles, device, timer, progress=False,
                                   directions=("fwd",))
    assert len(results) == 4
    for r in results:
        assert r.cudnn.ms == 1.0, r.cudnn.skipped
        assert [t.skipped for t in r.fused] == [None, None]  # every tile gave the reference's result
        assert r.best_fused.config == tiles[1]
        assert r.path == ("fused" if fused_wins else "cudnn")
    doc = tune.merge_fused_sections(tune.make_document([], "Fake GPU 9000"), results)
    registry.write(registry.cache, doc)
    want = "fused" if fused_wins else "cudnn"
    for reset_after in (False, True):
        for ks in ((3, 3), (1, 5)):
            assert _tuning.step_path(GPU, dtype, reset_after, "fwd", ks, 350) == want
    assert _tuning.step_path(GPU, dtype, False, "fwd", (5, 1), 350) == "cudnn"  # not tuned
    for kernel in ("conv_rz_fwd", "conv_n_fwd", "conv_reset_after_fwd"):
        assert _tuning.tile_config(kernel, dtype, 350, GPU) == tiles[1]
    # A later gate-kernel run keeps the fused entries of the file.
    kept = tune.make_document([], "Fake GPU 9000", doc)
    assert kept["step_paths"] == doc["step_paths"] and kept["fused_tiles"] == doc["fused_tiles"]


@pytest.mark.triton_kernels
def test_tune_fused_step_skips_a_wrong_tile(monkeypatch, device):
    """A tile whose result is wrong (a broken launch, as Inductor's 8-warp
    convolution template was) is skipped with the reason and never timed."""
    from convgru_triton.ops.fused_step import kernels as fused_step

    bad = _tuning.TileConfig(32, 16, 16, 8, 2)
    launch = fused_step._launch

    def broken(kernel, spec, h, has_bias, args, *more, **extra):
        launch(kernel, spec, h, has_bias, args, *more, **extra)
        if _tuning._FORCED_TILE == bad:
            args[3 if kernel is fused_step._conv_reset_after_fwd_kernel else 5][0, 0, 0, 0] += 1.0

    monkeypatch.setattr(fused_step, "_launch", broken)
    timed = []
    shape = tune.StepShape(2, 5, 5, 7, (3, 3), True, torch.float32, True)
    results = tune.tune_fused_step([shape], lambda d, direction: [_tuning.default_tile("conv_rz_fwd", d), bad],
                                   device, lambda fn: timed.append(_tuning._FORCED_TILE) or 1.0, progress=False,
                                   directions=("fwd",))
    trials = results[0].fused
    assert trials[0].ms == 1.0 and trials[1].ms is None
    assert trials[1].skipped.startswith("wrong result: h'")
    assert bad not in timed


@pytest.mark.slow
@pytest.mark.triton_kernels
def test_tune_fused_step_backward_chooses_and_writes(registry, device):
    """The backward step through conv_gru._step_backward: the cuDNN path and
    every tile of the fused one into NaN-poisoned buffers, each checked
    against autograd through the float64 references before it is timed; the
    choice lands in step_paths as "bwd", the tile in fused_tiles under the
    dgrad kernels. Tiny shapes not block multiples, float32: reset_before in
    NCHW with 3x3, reset_after in channels_last with 1x5 (~3 s interpreted)."""
    dtype = torch.float32
    shapes = (tune.step_shapes([(2, 5, 5, 7, (3, 3))], [], [dtype], [False], [False])
              + tune.step_shapes([(2, 5, 5, 7, (1, 5))], [], [dtype], [True], [True]))
    tiles = [_tuning.default_tile("conv_dgrad_bwd", dtype), _tuning.TileConfig(32, 16, 16, 4, 2)]
    asked = []

    def tiles_of(d, direction):
        asked.append((d, direction))
        return tiles

    results = tune.tune_fused_step(shapes, tiles_of, device, _fake_step_timer({64: 2.0, 32: 0.5}), progress=False,
                                   directions=("bwd",))
    assert asked == [(dtype, "bwd")] * 2
    assert [(r.direction, r.shape.reset_after) for r in results] == [("bwd", False), ("bwd", True)]
    for r in results:
        assert r.cudnn.ms == 1.0, r.cudnn.skipped
        assert [t.skipped for t in r.fused] == [None, None]  # both paths gave the reference's gradients
        assert r.best_fused.config == tiles[1] and r.path == "fused"
    table = tune.format_step_table(results)
    head, _, *rows = table.splitlines()
    assert head.split()[:2] == ["direction", "step"]
    assert [row.split()[:6] for row in rows] == [["bwd", "N=2", "H=5", "5x7", "3x3", "reset_before"],
                                                 ["bwd", "N=2", "H=5", "5x7", "1x5", "reset_after"]]
    doc = tune.merge_fused_sections(tune.make_document([], "Fake GPU 9000"), results)
    assert {e["direction"] for e in doc["step_paths"]} == {"bwd"}
    assert {e["kernel"] for e in doc["fused_tiles"]} == {"conv_dgrad_reset_gate_bwd", "conv_dgrad_bwd"}
    registry.write(registry.cache, doc)
    assert _tuning.step_path(GPU, dtype, False, "bwd", (3, 3), 350) == "fused"
    assert _tuning.step_path(GPU, dtype, True, "bwd", (1, 5), 350) == "fused"
    assert _tuning.step_path(GPU, dtype, False, "fwd", (3, 3), 350) == "cudnn"  # the forward was not tuned
    for kernel in ("conv_dgrad_reset_gate_bwd", "conv_dgrad_bwd"):
        assert _tuning.tile_config(kernel, dtype, 350, GPU) == tiles[1]
    assert _tuning.tile_config("conv_rz_fwd", dtype, 350, GPU) == _tuning.default_tile("conv_rz_fwd", dtype)


@pytest.mark.triton_kernels
def test_tune_fused_step_backward_skips_wrong_and_failing_tiles(monkeypatch, device):
    """A backward tile whose dL/dh is wrong, or whose launch raises, is skipped
    with the reason and never timed; the others are timed."""
    from convgru_triton.ops.fused_step import kernels as fused_step

    wrong, failing = _tuning.TileConfig(32, 16, 16, 8, 2), _tuning.TileConfig(16, 16, 16, 4, 2)
    launch = fused_step._launch_dgrad

    def broken(kernel, spec, d_h, *more, **extra):
        if _tuning._FORCED_TILE == failing:
            raise RuntimeError("out of resources: shared memory")
        launch(kernel, spec, d_h, *more, **extra)
        if _tuning._FORCED_TILE == wrong:
            d_h[0, 0, 0, 0] += 1.0

    monkeypatch.setattr(fused_step, "_launch_dgrad", broken)
    timed = []
    shape = tune.StepShape(2, 5, 5, 7, (3, 3), True, torch.float32, False)
    tiles = [_tuning.default_tile("conv_dgrad_bwd", torch.float32), wrong, failing]
    results = tune.tune_fused_step([shape], lambda d, direction: tiles, device,
                                   lambda fn: timed.append(_tuning._FORCED_TILE) or 1.0, progress=False,
                                   directions=("bwd",))
    trials = results[0].fused
    assert results[0].cudnn.ms == 1.0 and trials[0].ms == 1.0
    assert trials[1].ms is None and trials[1].skipped.startswith("wrong result: d h:")
    assert trials[2].ms is None and trials[2].skipped == "failed: RuntimeError: out of resources: shared memory"
    assert timed == [None, tiles[0]]


def test_step_case_direction():
    with pytest.raises(ValueError, match="direction"):
        tune.StepCase(tune.StepShape(1, 4, 3, 3, (3, 3), False, torch.float32, True), NOT_CUDA, "sideways")
    with pytest.raises(ValueError, match="direction"):
        tune.tune_fused_step([], lambda d, direction: [], NOT_CUDA, lambda fn: 1.0, progress=False,
                             directions=("up",))


def test_fused_sections_decide_shared_keys_together():
    def trial(ms, tile=None):
        return tune.Trial(tile, ms=ms)

    a, b = _tuning.TileConfig(64, 32, 64, 4, 2), _tuning.TileConfig(128, 64, 64, 8, 3)
    cl = tune.StepShape(6, 128, 46, 62, (3, 3), False, torch.bfloat16, True)
    nchw = tune.StepShape(6, 128, 46, 62, (3, 3), False, torch.bfloat16, False)
    results = [tune.StepResult(cl, "fwd", trial(1.0), [trial(0.9, a), trial(0.8, b)]),
               tune.StepResult(nchw, "fwd", trial(1.0), [trial(1.0, a), trial(1.5, b)])]
    paths, tiles = tune.fused_sections(results)
    # One registry key (layout is not part of it): fused 0.8 + 1.0 < cuDNN 2.0.
    assert [(p["path"], p["fused_ms"], p["cudnn_ms"]) for p in paths] == [("fused", 1.8, 2.0)]
    # Tile a: 0.9/0.8 + 1.0/1.0 = 2.125; tile b: 1 + 1.5 = 2.5 -> a, for both kernels of reset_before.
    assert {(t["kernel"], t["block_m"]) for t in tiles} == {("conv_rz_fwd", 64), ("conv_n_fwd", 64)}
    # The backward: its own step_paths entry; conv_dgrad_bwd runs in both formulations, so their
    # steps decide its tile together (b: 0.5/0.5 + 0.7/0.6 < a: 0.6/0.5 + 0.6/0.6; reset_before's
    # conv_dgrad_reset_gate_bwd by its step alone: b).
    after = tune.StepShape(6, 128, 46, 62, (3, 3), True, torch.bfloat16, True)
    results += [tune.StepResult(cl, "bwd", trial(1.0), [trial(0.6, a), trial(0.5, b)]),
                tune.StepResult(after, "bwd", trial(0.5), [trial(0.6, a), trial(0.7, b)])]
    paths, tiles = tune.fused_sections(results)
    assert sorted((p["direction"], p["reset_after"], p["path"]) for p in paths) == [
        ("bwd", False, "fused"), ("bwd", True, "cudnn"), ("fwd", False, "fused")]
    assert {(t["kernel"], t["block_m"]) for t in tiles if t["kernel"].startswith("conv_dgrad")} == {
        ("conv_dgrad_reset_gate_bwd", 128), ("conv_dgrad_bwd", 128)}


def test_command_fused_step_dry_run_and_bad_arguments(capsys):
    assert tune.main(["--fused-step", "--dry-run", "--sequence-shapes"]) == 0
    out = capsys.readouterr().out
    assert "N=6 H=128 46x62 1x5 reset_after bfloat16 cl" in out and "N=16 H=384 8x8 3x3" in out
    # Forward (3 accumulators): 64x32 at 4 warps, 64x32, 64x64, 128x32 at 8, x 2-4 stages.
    assert "fused step, fwd: 16 steps x (cuDNN convolutions + gate kernels, and 12 fused tiles" in out
    # Backward (one accumulator): every combination but 128x64 at 4 warps, x 2-4 stages.
    assert "fused step, bwd: 16 steps x (gate kernels + cuDNN dgrad" in out and "and 21 fused tiles" in out
    assert "conv_dgrad_bwd, conv_dgrad_reset_gate_bwd" in out
    assert "step_paths for fwd, bwd" in out
    assert tune.main(["--fused-step", "--dry-run", "--directions", "bwd"]) == 0
    out = capsys.readouterr().out
    assert "fused step, bwd" in out and "fused step, fwd" not in out
    for args in (["--shapes", "6,128"], ["--block-m", "96"], ["--fused-warps", "16"], ["--kernel-sizes", "3"],
                 ["--layouts", "nhwc"], ["--directions", "sideways"], ["--directions", "fwd,up"],
                 ["--directions", ","]):
        with pytest.raises(SystemExit) as exc:
            tune.main(["--fused-step", "--dry-run", *args])
        assert exc.value.code == 2, args
        assert "error" in capsys.readouterr().err


def test_command_fused_step_says_which_tiles_it_drops(capsys):
    # 3 x BLOCK_M x BLOCK_N / (32 x warps) accumulator values per thread: 64x64 at 8 warps 48 (kept);
    # 64x64 at 4 warps 96, 128x64 at 8 warps 96, 128x64 at 4 warps 192 (dropped, and said).
    assert tune.main(["--fused-step", "--dry-run", "--block-m", "64,128", "--block-n", "64", "--fused-warps", "4,8",
                      "--fused-stages", "2"]) == 0
    captured = capsys.readouterr()
    assert "not timing 3 tile(s) in bfloat16 for the fwd step" in captured.err
    assert "BLOCK_M 128, BLOCK_N 64, BLOCK_K 64, 4 warps, 2 stages" in captured.err
    assert "fwd: 6 steps x (cuDNN convolutions + gate kernels, and 2 fused tiles" in captured.out  # default, 64x64/8w
    # The backward's one accumulator: only 128x64 at 4 warps (64 values) is dropped.
    assert "not timing 1 tile(s) in bfloat16 for the bwd step" in captured.err
    assert "and 4 fused tiles" in captured.out  # the default, 64x64 at 4 and 8 warps, 128x64 at 8
    with pytest.raises(SystemExit) as exc:  # nothing asked for is left: an error, not a run of the default alone
        tune.main(["--fused-step", "--dry-run", "--block-m", "128", "--block-n", "64", "--fused-warps", "4"])
    assert exc.value.code == 2
    assert "only the default" in capsys.readouterr().err


def test_command_fused_step_writes_the_file_the_registry_then_uses(registry, monkeypatch, environment_at_import,
                                                                  capsys):
    """--fused-step on a new card (GPU calls and the timing run faked): the
    choice lands in the user file, next to the gate entries already there."""
    environment_at_import(TRITON_INTERPRET="0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU 9000")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    registry.write(registry.cache, _doc([_entry(256, 2)]))
    tile = _tuning.TileConfig(128, 32, 64, 8, 3)
    bwd_tile = _tuning.TileConfig(128, 64, 64, 8, 4)  # one accumulator: a backward candidate only
    seen = []

    def fake_tune_fused_step(shapes, tiles_of, device, timer, progress=True, directions=("fwd", "bwd")):
        seen.append((tuple(str(s) for s in shapes), tuple(directions)))
        assert tile in tiles_of(torch.bfloat16, "fwd") and bwd_tile not in tiles_of(torch.bfloat16, "fwd")
        assert bwd_tile in tiles_of(torch.bfloat16, "bwd")
        # The forward: fused wins; the backward: cuDNN wins (its tile is still written).
        times = {"fwd": (tile, 1.0, 0.5), "bwd": (bwd_tile, 0.5, 1.0)}
        return [tune.StepResult(s, d, tune.Trial(None, ms=times[d][1]), [tune.Trial(times[d][0], ms=times[d][2])])
                for d in directions for s in shapes]

    monkeypatch.setattr(tune, "tune_fused_step", fake_tune_fused_step)
    assert tune.main(["--fused-step", "--shapes", "6,128,46x62,3x3", "--formulations", "reset_after", "-q"]) == 0
    assert seen == [(("N=6 H=128 46x62 3x3 reset_after bfloat16 cl",), ("fwd", "bwd"))]  # both by default
    out = capsys.readouterr().out
    assert "wrote" in out
    assert [line.split()[:2] for line in out.splitlines() if "N=6" in line] == [["fwd", "N=6"], ["bwd", "N=6"]]
    _tuning.clear_cache()
    numel = 6 * 128 * 46 * 62
    assert _tuning.step_path(GPU, torch.bfloat16, True, "fwd", (3, 3), numel) == "fused"
    assert _tuning.step_path(GPU, torch.bfloat16, True, "bwd", (3, 3), numel) == "cudnn"
    assert _tuning.tile_config("conv_reset_after_fwd", torch.bfloat16, numel, GPU) == tile
    assert _tuning.tile_config("conv_dgrad_bwd", torch.bfloat16, numel, GPU) == bwd_tile
    assert lookup() == LaunchConfig(256, 2)  # the gate entry kept
    # --directions bwd: the backward alone, into the same file; the forward's entries stay.
    seen.clear()
    assert tune.main(["--fused-step", "--shapes", "6,128,46x62,3x3", "--formulations", "reset_after",
                      "--directions", "bwd", "-q"]) == 0
    assert seen == [(("N=6 H=128 46x62 3x3 reset_after bfloat16 cl",), ("bwd",))]
    _tuning.clear_cache()
    assert _tuning.step_path(GPU, torch.bfloat16, True, "fwd", (3, 3), numel) == "fused"
    assert _tuning.tile_config("conv_dgrad_bwd", torch.bfloat16, numel, GPU) == bwd_tile
