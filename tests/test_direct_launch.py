"""Launchers replay compiled kernels exactly as Triton's binder launches them.

After the first launch of a specialization, ``conv_gru_cell._launch`` calls the
compiled kernel itself instead of going through ``kernel[grid](...)`` (see
"Replaying compiled kernels" in :mod:`convgru_triton.ops.gates.kernels`). These
tests run the package's launchers with compiled (not interpreted) Triton, in a
subprocess (the test session runs Triton's interpreter), against a fake CUDA
target whose "compiled kernels" record how they are called, and check:

* a repeated launch goes through Triton's binder once, then is replayed, and the
  replay passes the kernel exactly the arguments the binder passed (same objects,
  same order: tensors, sizes, constexprs, grid, stream, launch hooks);
* a launch that Triton would specialize differently (a tensor not 16-byte
  aligned; a size of 1) goes through the binder again, never replays a kernel
  compiled for other facts;
* with replay off (``_DIRECT_LAUNCH``, which follows the direct_launch setting:
  CONVGRU_TRITON_DIRECT_LAUNCH=0) every launch goes through the binder.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    r"""
    import json, sys
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class FakeDriver:  # a CUDA sm_90 target on device 0, stream 7
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)
        def get_current_device(self):
            return 0
        def get_current_stream(self, device=None):
            return 7

    calls, compiles, binder_runs = [], [0], [0]

    class Recorder:  # what JITFunction caches instead of a compiled kernel
        function, packed_metadata = "function", "metadata"
        def launch_metadata(self, grid, stream, *args):
            return ("launch metadata", grid, stream)
        def run(self, *args):
            calls.append(args)

    compiled_names = []

    def fake_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        compiles[0] += 1
        compiled_names.append(self.__name__)
        kernel = Recorder()
        kernel.function = f"function {compiles[0]}"  # which specialization a launch ran
        self.device_caches[device][0][key] = kernel
        return kernel

    driver.set_active(FakeDriver())
    JITFunction._do_compile = fake_compile
    run = JITFunction.run
    def counting_run(self, *args, **kwargs):
        binder_runs[0] += 1
        return run(self, *args, **kwargs)
    JITFunction.run = counting_run

    from convgru_triton.ops.gates import kernels as op
    op._DIRECT_LAUNCH = sys.argv[1] == "on"

    def launch(gx, gh, h, out_gates, rh):
        op._reset_gate_fwd(gx, gh, h, bias_ih, bias_hh, gates=out_gates, rh=rh)

    H, S = 4, (6, 8)
    bias_ih, bias_hh = torch.randn(3 * H), torch.randn(3 * H)
    gx, gh, h = torch.randn(2, 3 * H, *S), torch.randn(2, 2 * H, *S), torch.randn(2, H, *S)
    gates, rh = torch.empty(2, 3 * H, *S), torch.empty(2, H, *S)

    def same(a, b):
        return len(a) == len(b) and all(
            x is y or (not isinstance(x, torch.Tensor) and type(x) is type(y) and x == y) for x, y in zip(a, b))

    result = {}
    for _ in range(3):
        launch(gx, gh, h, gates, rh)
    result["repeat"] = dict(binder=binder_runs[0], compiles=compiles[0], calls=len(calls),
                            identical=all(same(c, calls[0]) for c in calls),
                            leading=calls[0][3:6] == (7, "function 1", "metadata")
                            and calls[0][6][0] == "launch metadata" and calls[0][1:3] == (1, 1),
                            arguments=len(calls[0]) - 9)
    # h viewed 4 bytes past a 16-byte boundary: Triton specializes pointers on it.
    storage = torch.randn(h.numel() + 1)
    h_off = storage[1:].view_as(h)
    before = binder_runs[0]
    launch(gx, gh, h_off, gates, rh)
    launch(gx, gh, h_off, gates, rh)
    result["unaligned"] = dict(binder=binder_runs[0] - before, compiles=compiles[0])

    # The sequence operator's bound launches (conv_gru_cell._bind): cells and
    # sequences, both formulations, forward and backward, run three times. Each
    # kernel call is described without addresses (tensors by shape, strides,
    # dtype and the low 4 bits of their address, the rest by value), so runs
    # with replay on and off can be compared call by call.
    import convgru_triton._backend as backend_rule
    from convgru_triton import ConvGRU2d, ConvGRUCell2d
    backend_rule._interpreter_enabled = lambda: True  # backend="triton" on CPU tensors, as the host bench does

    def describe(args):
        return [["T", list(a.shape), list(a.stride()), str(a.dtype), a.data_ptr() % 16]
                if isinstance(a, torch.Tensor) else a if isinstance(a, (int, float, str, type(None)))
                else type(a).__name__ for a in args]

    from convgru_triton import conv_gru_cell

    def offset(t, elements=1):  # the same values, starting `elements` past an aligned address
        flat = torch.empty(t.numel() + elements, dtype=t.dtype)
        view = flat[elements:].view(t.shape)
        view.copy_(t)
        return view.requires_grad_(t.requires_grad)

    torch.manual_seed(0)
    scenarios = []  # (name, run(grad: bool))
    for r in (False, True):
        cell = ConvGRUCell2d(3, 4, 3, reset_after=r, backend="triton")
        seq = ConvGRU2d(3, 4, 3, reset_after=r, backend="triton")
        # 5 x 8 maps: rows of 8 float32 elements, so ALIGN depends on the addresses.
        x, h, xs = torch.randn(2, 3, 5, 8), torch.randn(2, 4, 5, 8), torch.randn(4, 2, 3, 5, 8)
        scenarios.append((f"cell r={r}", lambda grad, cell=cell, x=x, h=h: cell(x, h.requires_grad_(grad))))
        scenarios.append((f"sequence r={r}", lambda grad, seq=seq, xs=xs: seq(xs)[0]))
        cl = lambda t: t.contiguous(memory_format=torch.channels_last)
        scenarios.append((f"channels_last r={r}", lambda grad, cell=cell, x=cl(x), h=cl(h): cell(x, h)))
        # A contiguous input with a channels_last state: its pre-activations
        # must be copied into the state's layout, never replayed as they are.
        scenarios.append((f"mixed layouts r={r}", lambda grad, cell=cell, x=x, h=cl(h): cell(x, h)))
    cell1 = ConvGRUCell2d(3, 4, 3, bias=False, backend="triton")
    x1, h1 = torch.randn(1, 3, 5, 8), torch.randn(1, 4, 5, 8)
    scenarios.append(("N=1 no bias", lambda grad: cell1(x1, h1)))
    cell64 = ConvGRUCell2d(3, 4, 3, backend="triton", dtype=torch.float64)
    x64, h64 = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.randn(2, 4, 5, 8, dtype=torch.float64)
    scenarios.append(("float64", lambda grad: cell64(x64, h64)))
    w_ih, w_hh = cell.weight_ih, cell.weight_hh
    b_ih, b_hh = offset(cell.bias_ih.detach()), offset(cell.bias_hh.detach())
    h_off = offset(h)
    scenarios.append(("biases and state off 16-byte boundaries", lambda grad: conv_gru_cell(
        x, h_off, w_ih, w_hh, b_ih, b_hh, reset_after=True, backend="triton")))

    def round_():
        for name, run in scenarios:
            run(True).sum().backward()
            with torch.no_grad():
                run(False)

    first = len(calls)
    per_round = []
    for _ in range(3):
        before = binder_runs[0]
        round_()
        per_round.append(binder_runs[0] - before)
    def without_empty_hooks(call):
        # Launch metadata and hooks when no hook is registered (None, or an
        # empty chain in Triton >= 3.5): the cell plans pass None for all three
        # then, which launches the same way (nothing to call).
        enter, leave = call[7], call[8]
        if all(h is None or (type(h).__name__ == "HookChain" and not h.calls) for h in (enter, leave)):
            return call[:6] + ("no launch hooks",) * 3 + call[9:]
        return call

    result["operator"] = dict(calls=[describe(without_empty_hooks(c)) for c in calls[first:]],
                              binder_per_round=per_round,
                              bound=sum(len(k) for k in op._STEPS.values()))

    # The cell plans' fused-step launches (convgru_triton._plan): forward
    # kernels with the input convolution inside, the fused dgrad kernels and
    # the gate kernels of the backward, for cells of both formulations and
    # the separable cell, with and without gradients. The fake target counts
    # as CUDA for the fused step's support rule.
    import convgru_triton
    from convgru_triton import SepConvGRUCell2d
    from convgru_triton.ops.fused_step import kernels as fused_step
    real_supports = fused_step.supports
    fused_step.supports = lambda spec, dtype, device: real_supports(
        spec, dtype, torch.device("cuda") if device.type == "cpu" else device)
    fused_scenarios = []
    for r in (False, True):
        cell = ConvGRUCell2d(3, 4, 3, reset_after=r, backend="triton")
        sep = SepConvGRUCell2d(3, 4, reset_after=r, backend="triton")
        x, h = torch.randn(2, 3, 5, 8), torch.randn(2, 4, 5, 8)
        fused_scenarios.append(lambda grad, cell=cell, x=x, h=h: cell(x, h.requires_grad_(grad)))
        fused_scenarios.append(lambda grad, sep=sep, x=x, h=h: sep(x, sep(x, h.requires_grad_(grad))))
    first, per_round, fused_runs = len(calls), [], []
    with convgru_triton.override_settings(fused_step="1"):
        for _ in range(3):
            before = binder_runs[0]
            for scenario in fused_scenarios:
                scenario(True).sum().backward()
                with torch.no_grad():
                    scenario(False)
            per_round.append(binder_runs[0] - before)
    fused_names = {"_conv_rz_fwd_kernel", "_conv_n_fwd_kernel", "_conv_reset_after_fwd_kernel",
                   "_conv_dgrad_reset_gate_bwd_kernel", "_conv_dgrad_bwd_kernel"}
    # With a launch hook registered (a profiler), the bound launches pass the
    # launch metadata and the hooks exactly as Triton's own launch does.
    hooked_first = len(calls)
    hooks = triton.knobs.runtime
    seen = []
    hook = lambda metadata: seen.append(metadata)
    chain = getattr(hooks.launch_enter_hook, "add", None)
    if chain is not None:
        hooks.launch_enter_hook.add(hook)
    else:
        hooks.launch_enter_hook = hook
    with convgru_triton.override_settings(fused_step="1"):
        for scenario in fused_scenarios:
            scenario(True).sum().backward()
    if chain is not None:
        hooks.launch_enter_hook.remove(hook)
    else:
        hooks.launch_enter_hook = None
    hooked = [describe(c) for c in calls[hooked_first:]]
    del calls[hooked_first:]
    result["hooked"] = dict(calls=hooked)
    # The files a step's call enters, from the module down to the launches,
    # once its plan is bound: each at most once (the decision layer decides,
    # nothing below it asks again).
    def files_entered(fn):
        seq = []

        def profile(frame, event, arg):
            if event == "call" and "convgru_triton" in frame.f_code.co_filename:
                name = frame.f_code.co_filename.split("convgru_triton")[-1]
                if not seq or seq[-1] != name:
                    seq.append(name)

        sys.setprofile(profile)
        try:
            fn()
        finally:
            sys.setprofile(None)
        return seq

    entered = {}
    for fused in ("1", "0"):
        with convgru_triton.override_settings(fused_step=fused):
            for name, module in (("cell", ConvGRUCell2d(3, 4, 3, backend="triton")),
                                 ("sep", SepConvGRUCell2d(3, 4, backend="triton"))):
                x, h = torch.randn(2, 3, 5, 8), torch.randn(2, 4, 5, 8)
                hg = h.clone().requires_grad_()
                for _ in range(2):  # planned and bound
                    with torch.no_grad():
                        module(x, h)
                    module(x, hg).sum().backward()
                with torch.no_grad():
                    entered[f"{name} fused={fused} no_grad"] = files_entered(lambda: module(x, h))
                out = [None]
                entered[f"{name} fused={fused} forward"] = files_entered(lambda: out.__setitem__(0, module(x, hg)))
                entered[f"{name} fused={fused} backward"] = files_entered(lambda: out[0].sum().backward())
    del calls[hooked_first:]
    result["files"] = entered
    result["fused"] = dict(calls=[describe(without_empty_hooks(c)) for c in calls[first:]],
                           binder_per_round=per_round,
                           fused_compiles=sum(1 for name in compiled_names if name in fused_names))
    print(json.dumps(result))
    """
)


@functools.lru_cache(maxsize=None)  # one subprocess per mode for the whole module
def _run(mode: str) -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The slow tier: a subprocess per mode, each importing torch and Triton.
@pytest.mark.slow
def test_replay_passes_what_the_binder_passes():
    result = _run("on")
    repeat = result["repeat"]
    assert repeat["binder"] == 1 and repeat["compiles"] == 1, repeat
    assert repeat["calls"] == 3 and repeat["identical"], repeat
    # grid, 1, 1, stream, function, packed metadata, launch metadata, hooks, then
    # every parameter of _gru_reset_gate_fwd_kernel (7 pointers, 3 sizes, 6 constexprs).
    assert repeat["leading"], repeat
    assert repeat["arguments"] == 16, repeat
    unaligned = result["unaligned"]
    assert unaligned["binder"] == 1, "a launch Triton specializes differently must not replay the old kernel"
    assert unaligned["compiles"] == 2, unaligned


@pytest.mark.slow
def test_replay_off_uses_the_binder_every_time():
    repeat = _run("off")["repeat"]
    assert repeat["binder"] == 3 and repeat["calls"] == 3 and repeat["identical"], repeat


@pytest.mark.slow
def test_bound_launches_of_the_operator_pass_what_the_binder_passes():
    """The operator's bound launches (conv_gru_cell._bind) replay every kernel of
    cells and sequences -- both formulations, forward and backward, contiguous,
    channels_last and mixed layouts, N=1 without biases, float64, biases and a
    state off 16-byte boundaries -- with the arguments Triton's binder passes when replay
    is off, call by call; after the first of three rounds nothing goes through
    the binder."""
    on, off = _run("on")["operator"], _run("off")["operator"]
    assert len(on["calls"]) == len(off["calls"]) > 0
    for index, (replayed, bound) in enumerate(zip(on["calls"], off["calls"])):
        assert replayed == bound, f"kernel call {index} differs from the binder's"
    assert on["binder_per_round"][1:] == [0, 0], on["binder_per_round"]
    assert sum(off["binder_per_round"]) == len(off["calls"])
    assert on["bound"] >= 6 and off["bound"] == 0, "the bound launches were not used"
    # Some launches saw addresses off 16-byte boundaries (what the key's low bits are for).
    assert any(arg[4] for call in on["calls"] for arg in call if isinstance(arg, list))


def test_bound_fused_launches_of_the_cell_plans_pass_what_the_binder_passes():
    """The cell plans' fused-step launches (forward with the input convolution
    inside, the fused dgrad kernels, the gate kernels around them), for both
    formulations and the separable cell, with and without gradients: replayed
    with the arguments Triton's binder passes when replay is off, call by
    call; after the first of three rounds nothing goes through the binder."""
    on, off = _run("on")["fused"], _run("off")["fused"]
    assert on["fused_compiles"] >= 5, "the fused kernels did not run"
    assert len(on["calls"]) == len(off["calls"]) > 0
    for index, (replayed, bound) in enumerate(zip(on["calls"], off["calls"])):
        assert replayed == bound, f"kernel call {index} differs from the binder's"
    assert on["binder_per_round"][0] > 0 and on["binder_per_round"][1:] == [0, 0], on["binder_per_round"]
    assert sum(off["binder_per_round"]) == len(off["calls"])


def test_bound_launches_pass_launch_hooks_and_metadata():
    """With a launch hook registered, the cell plans' bound launches pass the
    launch metadata and the hooks that Triton's binder passes."""
    on, off = _run("on")["hooked"], _run("off")["hooked"]
    assert len(on["calls"]) == len(off["calls"]) > 0
    assert on["calls"] == off["calls"]
    assert all(call[6] != "no launch hooks" and call[7] is not None for call in on["calls"])


def test_a_bound_step_enters_each_file_once():
    """Followed from the module down to the launches, a bound step's call
    enters each of the package's files once: the module's, then the plan's,
    whose steps launch the compiled kernels themselves."""
    files = _run("on")["files"]
    assert len(files) == 12
    for what, seq in files.items():
        assert len(seq) == len(set(seq)), f"{what}: {seq}"
        assert set(seq) <= {"/modules.py", "/separable.py", "/_plan.py"}, f"{what}: {seq}"
