"""Launch configurations of the fused gate kernels: the tuning registry.

The gate kernels are elementwise and memory-bound: one program handles a tile
of ``block_size`` elements of one sample (whole runs of the memory-contiguous
axis, see :mod:`convgru_triton.ops.gates.kernels`) with ``num_warps`` warps.
Where the contiguous extent is not a multiple of one 16-byte vector the
launcher lowers the block to one access per thread and tensor. The best choice depends on the GPU, the dtype and the
size of the state, so the launchers ask :func:`launch_config` for it.

Where a configuration comes from, for a CUDA device (first match wins):

1. ``<tuning_dir>/<gpu>.json`` when the ``tuning_dir`` setting is set
   (``$CONVGRU_TRITON_TUNING_DIR`` at import, or ``override_settings(tuning_dir=...)``),
2. ``$XDG_CACHE_HOME/convgru_triton/tuning/<gpu>.json`` (default
   ``~/.cache/convgru_triton/tuning``; ``XDG_CACHE_HOME`` as read at import),
   where ``python -m convgru_triton.tune`` writes,
3. ``convgru_triton/tuning_configs/<gpu>.json`` shipped with the package,
4. :func:`default_config` (per dtype), sound on any GPU.

``<gpu>`` is the normalized device name (:func:`normalize_device_name`). A file
is used for a (kernel, dtype) pair when it has entries for that pair, and then
its entry of the nearest size (in log2 of the element count) is taken; files
further down the list are not mixed in for that pair. A file that cannot be read
or parsed, that breaks the schema or holds an invalid value, that was tuned
for another GPU or with another Triton major.minor version is skipped with one
:class:`TuningFileWarning` naming it. Block sizes never change results (the
kernels mask their tail), so any valid file gives correct results.

Every look-up is cached in memory per (device, kernel, dtype, size class): after
the first launch of a kernel on a device there is no file access and no JSON
parsing, only a dict look-up. Files are read again after :func:`clear_cache`,
and after the ``tuning_dir`` setting changed. Non-CUDA devices (the Triton interpreter on CPU) get
:func:`default_config` without any look-up. Under ``torch.compile`` the look-up
runs once at trace time and its result is a constant of the graph.

This module imports neither Triton nor the kernels.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

from . import _settings

# ----------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------

#: Triton's own default on NVIDIA GPUs. The gate kernels have no loops, so the
#: number of software-pipelining stages hardly matters for them.
DEFAULT_NUM_STAGES = 3


@dataclass(frozen=True)
class LaunchConfig:
    """``block_size`` elements per program (a power of two), ``num_warps`` warps,
    ``num_stages`` pipelining stages."""

    block_size: int
    num_warps: int
    num_stages: int = DEFAULT_NUM_STAGES

    def __str__(self) -> str:
        return f"block {self.block_size}, {self.num_warps} warps, {self.num_stages} stages"


# Sound on any GPU: 4 warps, each thread one 16-byte vector per tensor (8 half,
# 4 float32, 2 float64 elements), the widest global access there is. Twice that
# (1024 float32 elements) cost 70-72 registers per thread in the forward kernels
# (sm_90, Triton 3.9, bench/codegen.py) against 44-62 at 512.
DEFAULT_CONFIGS: Dict[torch.dtype, LaunchConfig] = {
    torch.float16: LaunchConfig(block_size=1024, num_warps=4),
    torch.bfloat16: LaunchConfig(block_size=1024, num_warps=4),
    torch.float32: LaunchConfig(block_size=512, num_warps=4),
    torch.float64: LaunchConfig(block_size=256, num_warps=4),
}
#: The default for float32 (see :func:`default_config` for the others).
DEFAULT_CONFIG = DEFAULT_CONFIGS[torch.float32]


def default_config(dtype: torch.dtype) -> LaunchConfig:
    """The configuration a kernel gets for ``dtype`` when no tuning file has one:
    one 16-byte access per thread and tensor with 4 warps."""
    return DEFAULT_CONFIGS.get(dtype, DEFAULT_CONFIG)

# The kernels that read their configuration here (names as in ops/gates/kernels.py,
# without the leading underscore and the _kernel suffix).
KERNELS = (
    "gru_reset_after_fwd",
    "gru_reset_after_bwd",
    "gru_reset_gate_fwd",
    "gru_update_fwd",
    "gru_update_bwd",
    "gru_reset_gate_bwd",
)

#: dtypes a tuning file may hold entries for, by their name in the file.
DTYPES: Dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

#: Valid values in a tuning file.
MIN_BLOCK_SIZE = 16
MAX_BLOCK_SIZE = 16384
NUM_WARPS = (1, 2, 4, 8, 16, 32)
NUM_STAGES = tuple(range(1, 9))

#: Version of the tuning-file layout this module reads and the tuner writes.
SCHEMA_VERSION = 1

ENV_DIR = "CONVGRU_TRITON_TUNING_DIR"
#: The shipped files (a folder of the package); a module attribute so tests can move it.
SHIPPED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuning_configs")


class TuningFileWarning(UserWarning):
    """A tuning file was skipped (unreadable, corrupt, invalid, another GPU's or
    stale); the configurations come from the next source, at worst the defaults."""


def normalize_device_name(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia_h100_80gb_hbm3"``: lower case, every
    run of other characters than letters and digits one underscore. Also the
    file name (without ``.json``) of the GPU's tuning file."""
    key = re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")
    return key or "unknown_gpu"


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (the name used in tuning files)."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        return str(dtype).replace("torch.", "")


def size_class(numel: int) -> int:
    """``ceil(log2(numel))``: the size classes are the powers of two, and sizes are
    compared by their class (a state of 3000 elements is in class 12, 4096)."""
    return max(0, (numel - 1).bit_length())


def user_cache_dir() -> str:
    """Where the tuner writes and the registry looks second:
    ``$XDG_CACHE_HOME/convgru_triton/tuning`` or ``~/.cache/convgru_triton/tuning``."""
    base = _settings.peek_settings().xdg_cache_home or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "convgru_triton", "tuning")


def user_tuning_dir() -> str:
    """The folder the tuner writes to by default: the ``tuning_dir`` setting
    (``$CONVGRU_TRITON_TUNING_DIR``) when set, else :func:`user_cache_dir`."""
    return _settings.peek_settings().tuning_dir or user_cache_dir()


def tuning_file_name(device_name: str) -> str:
    return normalize_device_name(device_name) + ".json"


def triton_version() -> Optional[str]:
    """The installed Triton's version without importing it (``None`` if unknown)."""
    module = sys.modules.get("triton")
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        from importlib.metadata import version as dist_version

        return dist_version("triton")
    except Exception:
        return None


def _major_minor(version: Optional[str]) -> Optional[Tuple[int, int]]:
    match = re.match(r"\s*(\d+)\.(\d+)", version or "")
    return (int(match.group(1)), int(match.group(2))) if match else None


# ----------------------------------------------------------------------------
# Reading and checking a tuning file
# ----------------------------------------------------------------------------


class TuningFileError(ValueError):
    """What is wrong with a tuning file (the message of the warning)."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise TuningFileError(message)


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool, not 1024.0


def check_config_values(block_size: Any, num_warps: Any, num_stages: Any = DEFAULT_NUM_STAGES) -> LaunchConfig:
    """A :class:`LaunchConfig` from the values, or :class:`TuningFileError` saying
    which one is out of range."""
    _require(
        _is_int(block_size) and MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE and block_size & (block_size - 1) == 0,
        f"block_size must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}, got {block_size!r}",
    )
    _require(_is_int(num_warps) and num_warps in NUM_WARPS, f"num_warps must be one of {NUM_WARPS}, got {num_warps!r}")
    _require(
        _is_int(num_stages) and num_stages in NUM_STAGES,
        f"num_stages must be an integer from {NUM_STAGES[0]} to {NUM_STAGES[-1]}, got {num_stages!r}",
    )
    return LaunchConfig(block_size, num_warps, num_stages)


# (kernel, dtype name) -> [(size class, config)] sorted by size class
Table = Dict[Tuple[str, str], List[Tuple[int, LaunchConfig]]]


def parse_document(doc: Any, device_key: Optional[str] = None) -> Table:
    """Check a parsed tuning file against the schema and return its table.

    Raises :class:`TuningFileError` on the first problem. ``device_key``, when
    given, must match the file's ``device``. Does not check the Triton version
    (see :func:`check_triton_version`).
    """
    _require(isinstance(doc, dict), f"the top level must be a JSON object, got {type(doc).__name__}")
    _require(
        doc.get("schema") == SCHEMA_VERSION and _is_int(doc.get("schema")),
        f"'schema' must be {SCHEMA_VERSION}, got {doc.get('schema')!r}",
    )
    for field in ("device", "triton_version", "torch_version", "created"):
        _require(isinstance(doc.get(field), str) and doc[field], f"'{field}' must be a non-empty string")
    _require(
        normalize_device_name(doc["device"]) == doc["device"],
        f"'device' must be a normalized device name, got {doc['device']!r}",
    )
    if device_key is not None:
        _require(doc["device"] == device_key, f"it was tuned for {doc['device']!r}, this GPU is {device_key!r}")
    _require(
        _major_minor(doc["triton_version"]) is not None,
        f"'triton_version' {doc['triton_version']!r} is not a version number",
    )
    entries = doc.get("entries")
    _require(isinstance(entries, list), "'entries' must be a list")
    table: Table = {}
    seen = set()
    for i, entry in enumerate(entries):
        where = f"entries[{i}]"
        _require(isinstance(entry, dict), f"{where} must be an object")
        kernel, dtype, numel = entry.get("kernel"), entry.get("dtype"), entry.get("numel")
        _require(kernel in KERNELS, f"{where}: unknown kernel {kernel!r} (known: {', '.join(KERNELS)})")
        _require(dtype in DTYPES, f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        _require(_is_int(numel) and numel > 0, f"{where}: 'numel' must be a positive integer, got {numel!r}")
        try:
            cfg = check_config_values(
                entry.get("block_size"), entry.get("num_warps"), entry.get("num_stages", DEFAULT_NUM_STAGES)
            )
        except TuningFileError as exc:
            raise TuningFileError(f"{where}: {exc}") from None
        for field in ("time_ms", "gb_per_s"):  # informative, but must be numbers if present
            value = entry.get(field)
            _require(
                value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)),
                f"{where}: '{field}' must be a number",
            )
        key = (kernel, dtype, size_class(numel))
        _require(key not in seen, f"{where}: a second entry for {kernel}, {dtype}, size class 2**{key[2]}")
        seen.add(key)
        table.setdefault((kernel, dtype), []).append((key[2], cfg))
    for rows in table.values():
        rows.sort(key=lambda row: row[0])
    return table


def check_triton_version(doc_version: str, installed: Optional[str]) -> None:
    """:class:`TuningFileError` when a file tuned with Triton ``doc_version`` is
    stale for the ``installed`` one (another major.minor version)."""
    have = _major_minor(installed)
    if have is not None and _major_minor(doc_version) != have:
        raise TuningFileError(
            f"it is stale: tuned with Triton {doc_version}, this is Triton {installed} "
            f"(rerun `python -m convgru_triton.tune`)"
        )


def nearest(rows: List[Tuple[int, LaunchConfig]], cls: int) -> LaunchConfig:
    """The configuration of the size class nearest to ``cls`` (the larger one on a tie)."""
    best = min(rows, key=lambda row: (abs(row[0] - cls), -row[0]))
    return best[1]


# ----------------------------------------------------------------------------
# The registry and its in-memory caches
# ----------------------------------------------------------------------------

# path -> table, or None when the file is absent or was skipped. Read once each.
_FILES: Dict[str, Optional[Table]] = {}
# paths already warned about (one warning per file)
_WARNED: set = set()
# (device, kernel, dtype, size class) -> config: the per-launch cache
_CACHE: Dict[Tuple[Any, str, torch.dtype, int], LaunchConfig] = {}
# CUDA device index -> normalized device name
_DEVICE_NAMES: Dict[int, str] = {}
# set by forced_config(): every launch uses this configuration
_FORCED: Optional[LaunchConfig] = None
# Moved whenever what launch_config() returns may change (forced_config,
# clear_cache, the tuning_dir setting): the launchers keep their launch geometry
# per output shape and rebuild it when this moved, instead of asking for the
# configuration at every launch (a look-up that was ~1 us of a ~12 us launch on
# the host). Every move also moves _settings.generation, the one number for the
# settings and this registry that the plan caches key on; this counter moves
# only with the registry, so that an override of an unrelated setting around a
# call does not rebuild the geometries (and drop their kept compiled kernels).
generation = 0


def _bump() -> None:
    global generation
    generation += 1
    _settings.bump()


def clear_cache() -> None:
    """Forget every file, look-up and device name read so far (and which files
    were warned about): the next launches read the files again. The tuner calls
    it after writing a file; a change of the ``tuning_dir`` setting does too."""
    _bump()
    _FILES.clear()
    _WARNED.clear()
    _CACHE.clear()
    _DEVICE_NAMES.clear()
    _FUSED_SECTIONS.clear()
    _PATH_CACHE.clear()
    _TILE_CACHE.clear()
    _FUSED_POSSIBLE.clear()


def _warn(path: str, problem: str) -> None:
    if path in _WARNED:
        return
    _WARNED.add(path)
    warnings.warn(
        f"convgru_triton: not using the tuning file {path}: {problem}. The fused kernels take their "
        f"launch configurations from the next source instead (at worst the built-in defaults).",
        TuningFileWarning,
        stacklevel=3,
    )


def _load(path: str, device_key: str, explicit: bool = False) -> Optional[Table]:
    """The table of the file at ``path`` (read once), or ``None`` when there is no
    such file or it is skipped (with a warning). A missing file is normal (no
    tuning for this GPU) unless ``explicit``: the user pointed at its folder."""
    if path in _FILES:
        return _FILES[path]
    table = None
    if not os.path.lexists(path):
        if explicit:
            _warn(path, f"{ENV_DIR} is set but there is no file for this GPU in that folder")
    else:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            _warn(path, f"it cannot be read ({type(exc).__name__}: {exc.strerror or exc})")
        else:
            try:
                doc = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                _warn(path, f"it is not valid JSON ({exc})")
            else:
                try:
                    table = parse_document(doc, device_key)
                    sections = parse_fused_sections(doc)
                    check_triton_version(doc["triton_version"], triton_version())
                except TuningFileError as exc:
                    table = None
                    _warn(path, str(exc))
                else:
                    _FUSED_SECTIONS[path] = sections
    _FILES[path] = table
    return table


def source_paths(device_key: str) -> List[Tuple[str, str]]:
    """``(origin, path)`` of the files consulted for a GPU, in order of precedence."""
    name = device_key + ".json"
    paths = []
    env_dir = _settings.peek_settings().tuning_dir
    if env_dir:
        paths.append((ENV_DIR, os.path.join(env_dir, name)))
    paths.append(("user cache", os.path.join(user_cache_dir(), name)))
    paths.append(("shipped", os.path.join(SHIPPED_DIR, name)))
    return paths


def resolve(device_key: str, kernel: str, dtype: torch.dtype, numel: int) -> Tuple[LaunchConfig, str]:
    """Uncached look-up for a GPU (normalized name): the configuration and where it
    came from (a file's path, or ``"defaults"``). Loads files it has not read yet."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; the tuned kernels are {KERNELS}")
    pair = (kernel, dtype_name(dtype))
    cls = size_class(numel)
    for origin, path in source_paths(device_key):
        table = _load(path, device_key, explicit=origin == ENV_DIR)
        rows = table.get(pair) if table is not None else None
        if rows:
            return nearest(rows, cls), path
    return default_config(dtype), "defaults"


def _device_key(device: torch.device) -> Optional[str]:
    """The normalized name of a CUDA device (asked once per device), ``None`` for
    other devices, which always get the defaults."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = _DEVICE_NAMES.get(index)
    if key is None:
        key = _DEVICE_NAMES[index] = normalize_device_name(torch.cuda.get_device_name(index))
    return key


def _lookup(kernel: str, dtype: torch.dtype, cls: int, device: torch.device) -> LaunchConfig:
    key = _device_key(device)
    if key is None:
        if kernel not in KERNELS:
            raise ValueError(f"unknown kernel {kernel!r}; the tuned kernels are {KERNELS}")
        return default_config(dtype)
    # 1 << cls stands for every size of the class: they share one cache entry.
    return resolve(key, kernel, dtype, 1 << cls)[0]


def _lookup_cached(kernel: str, dtype: torch.dtype, cls: int, device: torch.device) -> LaunchConfig:
    key = (device, kernel, dtype, cls)
    cfg = _CACHE.get(key)
    if cfg is None:
        cfg = _CACHE[key] = _lookup(kernel, dtype, cls, device)
    return cfg


# torch.compile: run the look-up when tracing and bake its result into the graph
# (it may read files the first time, which Dynamo cannot trace).
_assume_constant = getattr(getattr(torch, "compiler", None), "assume_constant_result", None) or (lambda fn: fn)
_lookup_traced = _assume_constant(_lookup_cached)


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return compiler.is_compiling()
    return False


def launch_config(kernel: str, dtype: torch.dtype, numel: int, device: torch.device) -> LaunchConfig:
    """Configuration for ``kernel`` (one of :data:`KERNELS`) on a state of ``numel``
    elements of ``dtype`` on ``device``. After the first call for a (device, kernel,
    dtype, size class) it is a dict look-up: no I/O per launch."""
    forced = _FORCED
    if forced is not None:
        return forced
    cls = size_class(numel)
    if _is_compiling():
        return _lookup_traced(kernel, dtype, cls, device)
    return _lookup_cached(kernel, dtype, cls, device)


def explain_config(kernel: str, dtype: torch.dtype, numel: int, device: torch.device) -> str:
    """Which configuration ``kernel`` gets and from where, e.g.
    ``"block 2048, 8 warps, 3 stages from /home/u/.cache/convgru_triton/tuning/nvidia_a100.json"``."""
    if _FORCED is not None:
        return f"{_FORCED} (forced)"
    key = _device_key(torch.device(device))
    if key is None:
        return f"{default_config(dtype)} from defaults ({torch.device(device).type} device)"
    cfg, source = resolve(key, kernel, dtype, numel)
    return f"{cfg} from {source}"


@contextlib.contextmanager
def forced_config(cfg: LaunchConfig) -> Iterator[LaunchConfig]:
    """Within the block every kernel launch uses ``cfg`` (the tuner and the tests
    use it; not thread-safe)::

        with forced_config(LaunchConfig(2048, 8)):
            ...  # launches
    """
    global _FORCED
    if not isinstance(cfg, LaunchConfig):
        raise TypeError(f"forced_config takes a LaunchConfig, got {type(cfg).__name__}")
    previous = _FORCED
    _FORCED = cfg
    _bump()
    try:
        yield cfg
    finally:
        _FORCED = previous
        _bump()


# ----------------------------------------------------------------------------
# The fused step: which path a step takes, and the fused kernels' tiles
# ----------------------------------------------------------------------------
#
# Two optional lists of a tuning file (schema 1; files without them stay valid):
#
# "step_paths": [{"dtype", "reset_after": bool, "direction": "fwd"|"bwd",
#                 "numel" (of the state N*H*Y*X), "kernel_size"?: [kh, kw],
#                 "path": "fused"|"cudnn", "fused_ms"?, "cudnn_ms"?}]
# "fused_tiles": [{"kernel" (one of FUSED_KERNELS), "dtype", "numel",
#                  "block_m", "block_n", "block_k", "num_warps", "num_stages"}]

#: Paths a step can take: the fused kernels of ops/fused_step/kernels.py, or cuDNN's
#: convolution followed by the gate kernels.
STEP_PATHS = ("fused", "cudnn")
#: The path without a tuned entry. "cudnn": no committed GPU figure of the fused
#: step exists yet (bench/results holds only cuDNN + gate-kernel runs, on an
#: H200), and a path is the default only where a GPU figure shows it faster.
DEFAULT_STEP_PATH = "cudnn"
DIRECTIONS = ("fwd", "bwd")
#: The fused kernels whose tiles the registry holds (names as in ops/fused_step/kernels.py,
#: without the leading underscore and the _kernel suffix): forward, then the
#: backward's dgrad kernels and the one-step cell's wgrad kernel
#: (ops/fused_step/kernels.py, its backward section; conv_wgrad's BLOCK_M are
#: output channels, BLOCK_N input channels, BLOCK_K pixels).
FUSED_KERNELS = ("conv_rz_fwd", "conv_n_fwd", "conv_reset_after_fwd", "conv_dgrad_reset_gate_bwd", "conv_dgrad_bwd",
                 "conv_wgrad")
TILE_BLOCK_M = (16, 32, 64, 128, 256)
TILE_BLOCK_NK = (16, 32, 64, 128)


@dataclass(frozen=True)
class TileConfig:
    """A fused kernel's tile: ``block_m`` output pixels x ``block_n`` hidden
    channels per program, ``block_k`` input channels per reduction step (the
    launcher caps block_n/block_k at the next power of two of the channels),
    ``num_warps`` warps, ``num_stages`` software-pipelining stages."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def __str__(self) -> str:
        return (f"BLOCK_M {self.block_m}, BLOCK_N {self.block_n}, BLOCK_K {self.block_k}, "
                f"{self.num_warps} warps, {self.num_stages} stages")


def default_tile(kernel: str, dtype: torch.dtype) -> TileConfig:
    """The tile a fused kernel gets without a tuned entry. BLOCK_M 64 is the
    smallest M of one Hopper wgmma. BLOCK_N 32: BLOCK_N 64 with up to three
    float32 accumulators took 239-255 registers per thread and spilled at
    sm_90 with 4 warps (bfloat16, RAFT's hidden 128 on 46x62, Triton 3.9).
    BLOCK_K 64 (32 in float32, whose tiles are twice the bytes). 4 warps (one
    warpgroup), except reset_after's kernel, which holds three accumulators:
    at 4 warps it took 255 registers on Triton 3.6 (the GPU machine's; 168 on
    3.9), no room left; at 8 warps 122 (80 on 3.9), no spills (bfloat16, 3x3,
    NCHW, sm_90; ``tests/test_fused_step.py`` checks the headroom). The fused
    step has no GPU timing yet: these tiles are chosen for registers, not speed."""
    block_k = 32 if dtype in (torch.float32, torch.float64) else 64
    warps = 8 if kernel == "conv_reset_after_fwd" else 4
    return TileConfig(block_m=64, block_n=32, block_k=block_k, num_warps=warps, num_stages=2)


def check_tile_values(block_m: Any, block_n: Any, block_k: Any, num_warps: Any, num_stages: Any) -> TileConfig:
    """A :class:`TileConfig` from the values, or :class:`TuningFileError` naming the bad one."""
    _require(_is_int(block_m) and block_m in TILE_BLOCK_M, f"block_m must be one of {TILE_BLOCK_M}, got {block_m!r}")
    for name, value in (("block_n", block_n), ("block_k", block_k)):
        _require(_is_int(value) and value in TILE_BLOCK_NK, f"{name} must be one of {TILE_BLOCK_NK}, got {value!r}")
    _require(_is_int(num_warps) and num_warps in (4, 8), f"num_warps must be 4 or 8, got {num_warps!r}")
    _require(
        _is_int(num_stages) and num_stages in NUM_STAGES,
        f"num_stages must be an integer from {NUM_STAGES[0]} to {NUM_STAGES[-1]}, got {num_stages!r}",
    )
    return TileConfig(block_m, block_n, block_k, num_warps, num_stages)


# (dtype name, reset_after, direction, kernel_size or None) -> [(size class, path)]
PathTable = Dict[Tuple[str, bool, str, Optional[Tuple[int, int]]], List[Tuple[int, str]]]
# (kernel, dtype name) -> [(size class, tile)]
TileTable = Dict[Tuple[str, str], List[Tuple[int, TileConfig]]]


def _check_number_fields(entry: dict, where: str, fields: Tuple[str, ...]) -> None:
    for name in fields:
        value = entry.get(name)
        _require(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)),
                 f"{where}: '{name}' must be a number")


def parse_fused_sections(doc: Any) -> Tuple[PathTable, TileTable]:
    """The ``step_paths`` and ``fused_tiles`` lists of a tuning file (both
    optional) as tables; :class:`TuningFileError` on the first problem."""
    paths: PathTable = {}
    tiles: TileTable = {}
    if not isinstance(doc, dict):
        return paths, tiles
    raw_paths = doc.get("step_paths", [])
    _require(isinstance(raw_paths, list), "'step_paths' must be a list")
    seen = set()
    for i, entry in enumerate(raw_paths):
        where = f"step_paths[{i}]"
        _require(isinstance(entry, dict), f"{where} must be an object")
        dtype, numel, path = entry.get("dtype"), entry.get("numel"), entry.get("path")
        reset_after, direction, ks = entry.get("reset_after"), entry.get("direction"), entry.get("kernel_size")
        _require(dtype in DTYPES, f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        _require(isinstance(reset_after, bool), f"{where}: 'reset_after' must be true or false, got {reset_after!r}")
        _require(direction in DIRECTIONS, f"{where}: 'direction' must be one of {DIRECTIONS}, got {direction!r}")
        _require(_is_int(numel) and numel > 0, f"{where}: 'numel' must be a positive integer, got {numel!r}")
        _require(path in STEP_PATHS, f"{where}: 'path' must be one of {STEP_PATHS}, got {path!r}")
        _require(ks is None or (isinstance(ks, list) and len(ks) == 2 and all(_is_int(k) and k > 0 for k in ks)),
                 f"{where}: 'kernel_size' must be [kh, kw] with positive integers, got {ks!r}")
        _check_number_fields(entry, where, ("fused_ms", "cudnn_ms"))
        key = (dtype, reset_after, direction, tuple(ks) if ks is not None else None)
        cls = size_class(numel)
        _require(key + (cls,) not in seen, f"{where}: a second entry for {key}, size class 2**{cls}")
        seen.add(key + (cls,))
        paths.setdefault(key, []).append((cls, path))
    raw_tiles = doc.get("fused_tiles", [])
    _require(isinstance(raw_tiles, list), "'fused_tiles' must be a list")
    seen = set()
    for i, entry in enumerate(raw_tiles):
        where = f"fused_tiles[{i}]"
        _require(isinstance(entry, dict), f"{where} must be an object")
        kernel, dtype, numel = entry.get("kernel"), entry.get("dtype"), entry.get("numel")
        _require(kernel in FUSED_KERNELS, f"{where}: unknown kernel {kernel!r} (known: {', '.join(FUSED_KERNELS)})")
        _require(dtype in DTYPES, f"{where}: unknown dtype {dtype!r} (known: {', '.join(DTYPES)})")
        _require(_is_int(numel) and numel > 0, f"{where}: 'numel' must be a positive integer, got {numel!r}")
        try:
            tile = check_tile_values(*(entry.get(k) for k in ("block_m", "block_n", "block_k", "num_warps",
                                                               "num_stages")))
        except TuningFileError as exc:
            raise TuningFileError(f"{where}: {exc}") from None
        _check_number_fields(entry, where, ("time_ms",))
        cls = size_class(numel)
        _require((kernel, dtype, cls) not in seen, f"{where}: a second entry for {kernel}, {dtype}, size class 2**{cls}")
        seen.add((kernel, dtype, cls))
        tiles.setdefault((kernel, dtype), []).append((cls, tile))
    for rows in list(paths.values()) + list(tiles.values()):
        rows.sort(key=lambda row: row[0])
    return paths, tiles


# path of a file -> its (PathTable, TileTable), filled by _load with the gate table
_FUSED_SECTIONS: Dict[str, Tuple[PathTable, TileTable]] = {}
# (device, dtype, reset_after, direction, kernel_size, size class) -> path
_PATH_CACHE: Dict[Tuple[Any, ...], str] = {}
# (device, kernel, dtype, size class) -> tile
_TILE_CACHE: Dict[Tuple[Any, ...], TileConfig] = {}


def _sections(path: str, device_key: str, explicit: bool) -> Optional[Tuple[PathTable, TileTable]]:
    _load(path, device_key, explicit)
    return _FUSED_SECTIONS.get(path)


def resolve_step_path(device_key: str, dtype: torch.dtype, reset_after: bool, direction: str,
                      kernel_size: Tuple[int, int], numel: int) -> Tuple[str, str]:
    """Uncached: the path (``"fused"`` or ``"cudnn"``) a step takes on a GPU and
    where that came from (a file, or ``"defaults"``). The first file (in
    :func:`source_paths`' order) with entries for (dtype, reset_after,
    direction) and either this kernel size or no kernel size decides: its
    entries for this kernel size if it has any, else those without one; the
    nearest size class. A file whose entries are all for other kernel sizes
    does not decide: the next file is asked."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    name, cls = dtype_name(dtype), size_class(numel)
    for origin, path in source_paths(device_key):
        sections = _sections(path, device_key, explicit=origin == ENV_DIR)
        if sections is None:
            continue
        rows = (sections[0].get((name, bool(reset_after), direction, tuple(kernel_size)))
                or sections[0].get((name, bool(reset_after), direction, None)))
        if rows:
            return min(rows, key=lambda row: (abs(row[0] - cls), -row[0]))[1], path
    return DEFAULT_STEP_PATH, "defaults"


def resolve_tile(device_key: str, kernel: str, dtype: torch.dtype, numel: int) -> Tuple[TileConfig, str]:
    """Uncached: a fused kernel's tile on a GPU and where it came from."""
    if kernel not in FUSED_KERNELS:
        raise ValueError(f"unknown fused kernel {kernel!r}; known: {FUSED_KERNELS}")
    for origin, path in source_paths(device_key):
        sections = _sections(path, device_key, explicit=origin == ENV_DIR)
        rows = sections[1].get((kernel, dtype_name(dtype))) if sections is not None else None
        if rows:
            return min(rows, key=lambda row: (abs(row[0] - size_class(numel)), -row[0]))[1], path
    return default_tile(kernel, dtype), "defaults"


#: Set by forced_tile(): every fused launch uses this tile (the tuner, the tests).
_FORCED_TILE: Optional[TileConfig] = None
#: Set by forced_step_path(): every step decision returns this path (the tuner, the tests).
_FORCED_PATH: Optional[str] = None


def step_path(device: torch.device, dtype: torch.dtype, reset_after: bool, direction: str,
              kernel_size: Tuple[int, int], numel: int) -> str:
    """``"fused"`` or ``"cudnn"`` for a step on ``device`` (cached per device, dtype,
    formulation, direction, kernel size and size class: a dict look-up after
    the first). Non-CUDA devices get :data:`DEFAULT_STEP_PATH`."""
    if _FORCED_PATH is not None:
        return _FORCED_PATH
    key = (device, dtype, bool(reset_after), direction, tuple(kernel_size), size_class(numel))
    path = _PATH_CACHE.get(key)
    if path is None:
        device_key = _device_key(device)
        if device_key is None:
            path = DEFAULT_STEP_PATH
        else:
            path = resolve_step_path(device_key, dtype, reset_after, direction, kernel_size, 1 << key[-1])[0]
        _PATH_CACHE[key] = path
    return path


# device -> whether any file consulted for it names the fused path (fused_path_possible)
_FUSED_POSSIBLE: Dict[Any, bool] = {}


def fused_path_possible(device: torch.device) -> bool:
    """Whether :func:`step_path` can answer ``"fused"`` for any step on
    ``device``: a file consulted for it has a ``step_paths`` entry naming the
    fused path, or :func:`forced_step_path` forces it. Cached per device.
    The one-step cell asks it once per plan (``functional._plan_cell``): under
    ``auto``, on a GPU for which no file names the fused path (every GPU
    today), the cell then does not try the fused input convolution at every
    call."""
    if _FORCED_PATH is not None:
        return _FORCED_PATH == "fused"
    possible = _FUSED_POSSIBLE.get(device)
    if possible is None:
        possible = DEFAULT_STEP_PATH == "fused"
        device_key = _device_key(device)
        if device_key is not None and not possible:
            for origin, path in source_paths(device_key):
                sections = _sections(path, device_key, explicit=origin == ENV_DIR)
                if sections is not None and any(
                        choice == "fused" for rows in sections[0].values() for _, choice in rows):
                    possible = True
                    break
        _FUSED_POSSIBLE[device] = possible
    return possible


def tile_config(kernel: str, dtype: torch.dtype, numel: int, device: torch.device) -> TileConfig:
    """A fused kernel's tile for a state of ``numel`` elements (cached as
    :func:`step_path`); non-CUDA devices get :func:`default_tile`."""
    if _FORCED_TILE is not None:
        return _FORCED_TILE
    key = (device, kernel, dtype, size_class(numel))
    tile = _TILE_CACHE.get(key)
    if tile is None:
        device_key = _device_key(device)
        if device_key is None:
            if kernel not in FUSED_KERNELS:
                raise ValueError(f"unknown fused kernel {kernel!r}; known: {FUSED_KERNELS}")
            tile = default_tile(kernel, dtype)
        else:
            tile = resolve_tile(device_key, kernel, dtype, 1 << key[-1])[0]
        _TILE_CACHE[key] = tile
    return tile


@contextlib.contextmanager
def forced_tile(tile: Optional[TileConfig]) -> Iterator[Optional[TileConfig]]:
    """Within the block every fused launch uses ``tile`` (``None``: the registry's)."""
    global _FORCED_TILE
    if tile is not None and not isinstance(tile, TileConfig):
        raise TypeError(f"forced_tile takes a TileConfig or None, got {type(tile).__name__}")
    previous, _FORCED_TILE = _FORCED_TILE, tile
    _bump()
    try:
        yield tile
    finally:
        _FORCED_TILE = previous
        _bump()


@contextlib.contextmanager
def forced_step_path(path: Optional[str]) -> Iterator[Optional[str]]:
    """Within the block every step decision returns ``path`` (``None``: the registry's)."""
    global _FORCED_PATH
    if path is not None and path not in STEP_PATHS:
        raise ValueError(f"path must be one of {STEP_PATHS} or None, got {path!r}")
    previous, _FORCED_PATH = _FORCED_PATH, path
    _bump()
    try:
        yield path
    finally:
        _FORCED_PATH = previous
        _bump()


@_settings.on_change
def _folders_changed(old: "_settings.Settings", new: "_settings.Settings") -> None:
    """Another ``tuning_dir`` (``override_settings``) or user cache: every look-up
    is cached per device, not per folder, so the files are read again."""
    if (old.tuning_dir, old.xdg_cache_home) != (new.tuning_dir, new.xdg_cache_home):
        clear_cache()
