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
:data:`generation`, which the plan caches key on, so the next call plans for
the settings in force (or finds the plans made for them before).
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
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

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


def _from_environment(environ: Optional[Mapping[str, str]] = None) -> Tuple[Settings, Optional[ValueError]]:
    """The settings of ``environ`` (default: ``os.environ``) and the error of
    its first bad value, or ``None``. A bad value leaves that setting's default."""
    environ = os.environ if environ is None else environ
    values, sources, error = {}, [], None
    for name, (variable, _, default) in _SPEC.items():
        raw = environ.get(variable)
        if raw is None or (raw.strip() == "" and name != "tuning_dir"):
            values[name] = default
            continue
        try:
            values[name] = _check(name, raw, "environment")
            sources.append((name, "environment"))
        except ValueError as exc:
            values[name] = default
            error = error or exc
    interpret = environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "off")
    settings = Settings(**values, triton_interpret=interpret,
                        xdg_cache_home=environ.get("XDG_CACHE_HOME") or None, sources=tuple(sources))
    return settings, error


_current, _environment_error = _from_environment()

#: A number for the settings in force and the tuning registry's state: it moves
#: at every change of the settings and at every :func:`bump` (the tuning
#: registry calls it), and plan caches keep it in their keys. Going back to
#: settings in force before, with no bump since, gives their number back, so
#: that an override around each call (a benchmark's providers) finds the plans
#: made at its previous call instead of planning again.
generation = 0
_issued = 0  # the last number given out; numbers are never reused after a bump
_numbers: Dict[Tuple[Settings, bool], int] = {}  # since the last bump: settings -> their number
#: Called as ``listener(old, new)`` after every change of the settings
#: (:func:`on_change`): for state that is not keyed on :data:`generation`.
_listeners: List[Callable[[Settings, Settings], None]] = []


def _renumber() -> None:
    global generation, _issued
    key = (_current, _environment_error is None)
    number = _numbers.get(key)
    if number is None:
        _issued += 1
        number = _numbers[key] = _issued
    generation = number


_renumber()


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
    """Move :data:`generation` to a number not given out before: something a
    plan depends on changed (a tuning file re-read, a launch path forced)."""
    _numbers.clear()
    _renumber()


def on_change(listener: Callable[[Settings, Settings], None]) -> Callable[[Settings, Settings], None]:
    """Call ``listener(old, new)`` after every change of the settings (the start
    and the end of each :func:`override`); returns ``listener``. For state read
    at every launch, where a look-up of :data:`generation` would cost time."""
    _listeners.append(listener)
    return listener


def _changed(old: Settings) -> None:
    _renumber()
    for listener in _listeners:
        listener(old, _current)


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

    Every change moves :data:`generation`, which the plan caches key on: plans
    made inside the block answer only under these settings. Not thread-safe:
    settings are process-wide.
    """
    global _current, _environment_error
    unknown = sorted(set(changes) - set(_SPEC))
    if unknown:
        raise TypeError(f"override_settings() got unknown settings {unknown}; the settings are {sorted(_SPEC)}")
    checked = {name: _check(name, value, "override") for name, value in changes.items()}
    previous, previous_error = _current, _environment_error
    key = (previous, tuple(checked.items()))
    _current = _DERIVED.get(key)
    if _current is None:
        sources = dict(previous.sources)
        sources.update((name, "override") for name in checked)
        if len(_DERIVED) >= 256:
            _DERIVED.clear()
        _current = _DERIVED[key] = dataclasses.replace(previous, **checked, sources=tuple(sorted(sources.items())))
    if previous_error is not None and any(variable_setting in checked for variable_setting in _bad_settings()):
        _environment_error = None
    _changed(previous)
    try:
        yield _current
    finally:
        inner = _current
        _current, _environment_error = previous, previous_error
        _changed(inner)


# (settings, changes) -> the settings an override makes of them: an override
# around every call (a benchmark's providers) then builds no new object.
_DERIVED: Dict[tuple, Settings] = {}


def _bad_settings() -> Tuple[str, ...]:
    """The settings whose environment variable held a bad value."""
    if _environment_error is None:
        return ()
    return tuple(name for name, (variable, _, _) in _SPEC.items() if variable in str(_environment_error))


def parse(name: str, value: str) -> Optional[str]:
    """``value`` for setting ``name`` as :func:`override` takes it (stripped,
    lower-cased; empty is the default).

    Raises:
        ValueError: a value the setting does not take, naming the setting,
            its environment variable, the values it takes and the value given.
    """
    return _check(name, value, "override")


def environment_variable(name: str) -> str:
    """The environment variable of setting ``name``."""
    return _SPEC[name][0]


def describe() -> Dict[str, Tuple[str, str]]:
    """setting -> (value, source), for reports (``python -m convgru_triton``)."""
    s = _current
    return {name: (str(getattr(s, name)), s.source(name)) for name in _SPEC}
