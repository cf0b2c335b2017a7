"""Every setting of the package, read from the environment once, in this one module.

The settings (docs/configuration.md has the table):

====================  ===================================  =========================================
setting               environment variable                 values (default first)
====================  ===================================  =========================================
``backend``           ``CONVGRU_TRITON_BACKEND``           ``auto``, ``torch``, ``triton``
``layout``            ``CONVGRU_TRITON_LAYOUT``            ``auto``, ``channels_last``, ``keep``
``fused_step``        ``CONVGRU_TRITON_FUSED_STEP``        ``auto``, ``1``, ``0``
``tuning_dir``        ``CONVGRU_TRITON_TUNING_DIR``        a folder, or unset
``direct_launch``     ``CONVGRU_TRITON_DIRECT_LAUNCH``     ``1``, ``0``
====================  ===================================  =========================================

Two more facts come from the environment and are read here too, never changed:
``TRITON_INTERPRET`` (Triton's interpreter, fixed when ``triton`` is imported)
and ``XDG_CACHE_HOME`` (where the tuner's user cache lives).

The environment is read when the package is imported. After that a setting
changes only through :func:`override`, a context manager; every change moves
:data:`generation`, which the plan caches key on, so the next call plans again.
Nothing else in the package reads ``os.environ``.

A bad value in the environment does not break ``import convgru_triton``
(``python -m convgru_triton`` must still report it): :func:`get_settings`
raises the ValueError, naming the variable, the values it takes and the value
given, at the first call that needs the settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Dict, Iterator, Optional, Tuple

#: setting -> (environment variable, accepted values or None for free text, default)
_SPEC: Dict[str, Tuple[str, Optional[Tuple[str, ...]], Optional[str]]] = {
    "backend": ("CONVGRU_TRITON_BACKEND", ("auto", "torch", "triton"), "auto"),
    "layout": ("CONVGRU_TRITON_LAYOUT", ("auto", "channels_last", "keep"), "auto"),
    "fused_step": ("CONVGRU_TRITON_FUSED_STEP", ("auto", "1", "0"), "auto"),
    "tuning_dir": ("CONVGRU_TRITON_TUNING_DIR", None, None),
    "direct_launch": ("CONVGRU_TRITON_DIRECT_LAUNCH", ("1", "0"), "1"),
}

_WHAT = {
    "backend": "the gate math's backend where a module's backend argument is 'auto'",
    "layout": "the memory format the package computes in",
    "fused_step": "'1': the fused convolution-and-gate step; '0': cuDNN + the gate kernels; "
                  "'auto': the tuning registry decides",
    "tuning_dir": "a folder of tuning files searched first",
    "direct_launch": "'1': compiled kernels are called directly after their first launch; "
                     "'0': every launch goes through Triton's argument binder",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The settings in force. Frozen: change them with :func:`override`.

    Attributes:
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
        layout: ``"auto"``, ``"channels_last"`` or ``"keep"``.
        fused_step: ``"auto"``, ``"1"`` or ``"0"``.
        tuning_dir: a folder of tuning files, or ``None``.
        direct_launch: ``"1"`` or ``"0"``.
        triton_interpret: ``TRITON_INTERPRET`` was set (not ``0``) at import.
        xdg_cache_home: ``XDG_CACHE_HOME``, or ``None``.
        sources: setting -> ``"default"``, ``"environment"`` or ``"override"``.
    """

    backend: str = "auto"
    layout: str = "auto"
    fused_step: str = "auto"
    tuning_dir: Optional[str] = None
    direct_launch: str = "1"
    triton_interpret: bool = False
    xdg_cache_home: Optional[str] = None
    sources: Tuple[Tuple[str, str], ...] = ()

    def source(self, name: str) -> str:
        """Where setting ``name`` came from: ``default``, ``environment`` or ``override``."""
        return dict(self.sources).get(name, "default")


def _check(name: str, value, origin: str) -> Optional[str]:
    variable, choices, _ = _SPEC[name]
    if value is None:
        if choices is None:
            return None
        raise ValueError(f"{name} must be one of {choices}, got None")
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    text = value.strip()
    if choices is None:
        return text or None
    text = text.lower() or _SPEC[name][2]
    if text not in choices:
        where = f"environment variable {variable}" if origin == "environment" else f"{name} ({variable})"
        raise ValueError(f"{where} must be one of {', '.join(repr(c) for c in choices)} ({_WHAT[name]}), "
                         f"got {value!r}")
    return text


def _from_environment() -> Tuple[Settings, Optional[ValueError]]:
    values, sources, error = {}, [], None
    for name, (variable, _, default) in _SPEC.items():
        raw = os.environ.get(variable)
        if raw is None or (raw.strip() == "" and name != "tuning_dir"):
            values[name] = default
            continue
        try:
            values[name] = _check(name, raw, "environment")
            sources.append((name, "environment"))
        except ValueError as exc:
            values[name] = default
            error = error or exc
    interpret = os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off")
    settings = Settings(**values, triton_interpret=interpret,
                        xdg_cache_home=os.environ.get("XDG_CACHE_HOME") or None, sources=tuple(sources))
    return settings, error


_current, _environment_error = _from_environment()

#: Moves at every change of the settings (and of the tuning registry, which
#: calls :func:`bump`): plan caches keep it in their keys.
generation = 0


def get_settings() -> Settings:
    """The settings in force.

    Raises:
        ValueError: a ``CONVGRU_TRITON_*`` environment variable held an unknown
            value at import (the message names it, the values it takes and the
            value given); an :func:`override` of that setting lifts the error.
    """
    if _environment_error is not None:
        raise _environment_error
    return _current


def peek_settings() -> Settings:
    """The settings in force, without raising for a bad environment value
    (``python -m convgru_triton`` reports that error instead)."""
    return _current


def environment_error() -> Optional[ValueError]:
    """The error of a bad ``CONVGRU_TRITON_*`` environment variable, or ``None``."""
    return _environment_error


def bump() -> None:
    """Move :data:`generation`: something a plan depends on changed."""
    global generation
    generation += 1


@contextlib.contextmanager
def override(**changes) -> Iterator[Settings]:
    """Change settings for the duration of a ``with`` block, then restore them.

    ``with convgru_triton.override_settings(fused_step="1", layout="keep"): ...``

    Args:
        backend, layout, fused_step, tuning_dir, direct_launch: as in the
            environment variables (strings; ``tuning_dir`` may be ``None``).

    Yields:
        The :class:`Settings` in force inside the block.

    Raises:
        TypeError: an unknown setting, or a value that is not a string.
        ValueError: a value the setting does not take (the message names the
            setting, the values it takes and the value given).

    Plans made inside the block are not reused outside it: every change moves
    :data:`generation`. Not thread-safe: settings are process-wide.
    """
    global _current, _environment_error
    unknown = sorted(set(changes) - set(_SPEC))
    if unknown:
        raise TypeError(f"override_settings() got unknown settings {unknown}; the settings are {sorted(_SPEC)}")
    checked = {name: _check(name, value, "override") for name, value in changes.items()}
    previous, previous_error = _current, _environment_error
    sources = dict(previous.sources)
    sources.update((name, "override") for name in checked)
    _current = dataclasses.replace(previous, **checked, sources=tuple(sorted(sources.items())))
    if previous_error is not None and any(variable_setting in checked for variable_setting in _bad_settings()):
        _environment_error = None
    bump()
    try:
        yield _current
    finally:
        _current, _environment_error = previous, previous_error
        bump()


def _bad_settings() -> Tuple[str, ...]:
    """The settings whose environment variable held a bad value."""
    if _environment_error is None:
        return ()
    return tuple(name for name, (variable, _, _) in _SPEC.items() if variable in str(_environment_error))


def environment_variable(name: str) -> str:
    """The environment variable of setting ``name``."""
    return _SPEC[name][0]


def describe() -> Dict[str, Tuple[str, str]]:
    """setting -> (value, source), for reports (``python -m convgru_triton``)."""
    s = _current
    return {name: (str(getattr(s, name)), s.source(name)) for name in _SPEC}
