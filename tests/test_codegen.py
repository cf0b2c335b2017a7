"""What the GPU compiler makes of the gate kernels and the fused step, checked in CI without a GPU.

Once per session, ``python -m bench.codegen`` runs in three subprocesses side
by side (the test session itself runs Triton's interpreter, which has no
compiler): the gate kernels for a fake sm_90 (H100/H200) and a fake sm_80
(A100) target, and the fused step's kernels for sm_90, each compiled
through the package's ordinary launch path. Wall time on this project's
2-core CPU machines about 100 s with an empty Triton cache, about 30 s with a
warm one. The gate
kernels' cases (a 2-step ConvGRU2d, N=2, forward without autograd and
forward + backward, both formulations):

* RAFT's 1/8 map, 46x62 with hidden 128, every dtype and layout, sm_90 and sm_80:
  every kernel compiles; in channels_last its contiguous extent (128 channels)
  is a multiple of 8; in NCHW (2852 = 4 * 713 pixels) it is a multiple of 4 only.
* hidden 24 on 24x41 (984 = 8 * 123 pixels, 24 channels: multiples of 8 but not
  of 16, where a kernel that only vectorizes multiples of 16 shows), float16 and
  float32, both layouts, sm_90.

The rules, per compiled gate kernel, at the default launch
configuration (no tuning file: what a CPU device gets from ``_tuning``):

* no local memory and no stack frame (spills);
* at most :data:`MAX_REGISTERS` registers per thread;
* **tensor** accesses (global loads/stores whose address derives from a state,
  gate or gradient pointer argument) of a kernel used by a case whose
  contiguous extent is a multiple of 8 elements: none narrower than 16 bytes;
  at RAFT's 46x62 in NCHW, float16/bfloat16: none narrower than 8 bytes;
* **bias** accesses (address derived only from arguments named ``*bias*``) may be
  of any width (a per-row scalar is fine) but at most :data:`MAX_BIAS_ACCESSES`
  per thread;
* every global access is traced to a pointer argument, and every kernel loads
  and stores tensors with ``ld.global``/``st.global`` (else the width rules
  would pass vacuously; a kernel moving data otherwise, e.g. by TMA, needs these
  tests extended).

The fused step (``bench.codegen.fused_cases``): RAFT's ConvGRU 3x3 and
SepConvGRU 1x5 + 5x1 (N=6, 46x62, hidden 128), bfloat16, both layouts and
formulations, its forward kernels (inference and saving) and backward kernels
(the dgrad kernels; the one-step cell's wgrad kernel for W_hh and for W_ih
from x of 256 channels with its bias, and the dgrad kernel for d_x) at the
package's default tiles: each has a row in the report, uses wgmma and spills
nothing (its registers are not held to the gate kernels' bound: 64 is a gate
kernel's budget, an implicit GEMM holds accumulators).

Skipped, with the reason, only when Triton's NVIDIA backend (ptxas, cuobjdump)
is unavailable. The PTX reading itself is tested on hand-written PTX.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import codegen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The slow tier: every test compiles kernels for fake sm_90/sm_80 targets (minutes).
pytestmark = pytest.mark.slow

#: The gate kernels' bound: at most 64 registers per thread at the default launch configuration.
MAX_REGISTERS = 64
#: The most bias slices a kernel reads is 6 (reset_after forward: b_ih and b_hh
#: for r, z and n); one load per slice and row, and up to two rows per thread.
MAX_BIAS_ACCESSES = 12
RAFT = (128, (46, 62))
ODD8 = (24, (24, 41))
ARCHS = (90, 80)
# At 24x41 float16 and float32 only: bfloat16 has float16's widths and float64
# reaches 16 bytes with 2 elements; all four are compiled (both targets, both
# layouts) at RAFT's size.
SHAPES = [f"{RAFT[0]},46x62", f"{ODD8[0]},24x41@90/float16,float32"]


#: The subprocesses: (arch, what they compile); the fused step apart so that the three share the two cores.
RUNS = ((90, "gates"), (80, "gates"), (90, "fused"))


@pytest.fixture(scope="session")
def codegen_result(tmp_path_factory):
    """One ``python -m bench.codegen`` per entry of :data:`RUNS`, run side by
    side (one CPU thread each), merged into one result."""
    folder = tmp_path_factory.mktemp("codegen")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    procs = []
    for arch, kernels in RUNS:
        out = folder / f"sm{arch}-{kernels}.json"
        cmd = [sys.executable, "-m", "bench.codegen", "--arch", str(arch), "--json", str(out), "--quiet",
               "--threads", "1", "--kernels", kernels]
        if kernels == "gates":
            for s in SHAPES:
                cmd += ["--shape", s]
        procs.append((arch, kernels, out, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                                           stderr=subprocess.PIPE, text=True)))
    merged = None
    for arch, kernels, out, proc in procs:
        _, err = proc.communicate(timeout=1800)
        if proc.returncode == codegen.EXIT_NO_BACKEND:
            pytest.skip(err.strip().splitlines()[-1] if err.strip() else "no NVIDIA backend")
        if not out.exists():
            pytest.fail(f"bench.codegen --arch {arch} --kernels {kernels} failed (exit {proc.returncode}):\n"
                        f"{err[-4000:]}")
        with open(out) as f:
            part = json.load(f)
        if merged is None:
            merged = part
            continue
        merged["archs"] += [a for a in part["archs"] if a not in merged["archs"]]
        for arch_key, tags in part["ran"].items():
            merged["ran"].setdefault(arch_key, []).extend(tags)
        merged["cases"] += [c for c in part["cases"] if c not in merged["cases"]]
        merged["errors"] += part["errors"]
        merged["kernels"] += part["kernels"]
    return merged


def _cases(result, predicate):
    """The gate kernels' cases (dicts of result["cases"]) for which ``predicate(Case)`` holds."""
    return [c for c in result["cases"] if c["op"] != "fused"
            and predicate(codegen.Case(**{**c, "size": tuple(c["size"]), "archs": tuple(c["archs"])}))]


def _gate_kernels(result):
    """The kernels the gate kernels' rules are about: every one but the fused step's."""
    return [k for k in result["kernels"] if not codegen.is_fused(k)]


def _tag_matches(tag: str, case: dict) -> bool:
    shape = f"H={case['hidden']} {'x'.join(map(str, case['size']))}"
    return f" {shape} {case['dtype']} {case['layout']} reset_after={case['reset_after']}" in f" {tag}"


def _kernels_of(result, cases):
    """Gate kernels launched by any of ``cases`` (dicts of result["cases"])."""
    return [k for k in _gate_kernels(result) if any(_tag_matches(t, c) for t in k["cases"] for c in cases)]


def _name(k) -> str:
    return (f"sm_{k['arch']} {k['kernel']} [{k['variant']}] {k['dtype']} "
            f"(used by {k['cases'][0]}{' …' if len(k['cases']) > 1 else ''})")


def _narrow(k, width: int):
    return {f"{op} {w} B": n for op in ("ld", "st") for w, n in k["accesses"].get(f"{op}_tensor", {}).items()
            if int(w) < width}


def _narrower_than(kernels, width: int):
    """One line per kernel with tensor accesses narrower than ``width`` bytes."""
    return sorted(f"{_name(k)}: {_narrow(k, width)}" for k in kernels if _narrow(k, width))


# ----------------------------------------------------------------------------
# Compiler output
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [90, 80])
def test_every_case_compiles(codegen_result, arch):
    """Every dtype, layout and formulation at RAFT's size compiles for the
    target (the interpreter tests cannot catch what only the compiler rejects)."""
    ran = codegen_result["ran"][str(arch)]
    want = {(d, lay, ra) for d in codegen.DTYPES for lay in codegen.LAYOUTS for ra in (False, True)}
    got = {(t.split()[3], t.split()[4], t.split()[5] == "reset_after=True") for t in ran if "46x62" in t}
    assert got == want, f"cases not run for sm_{arch}: {sorted(want - got)}"
    failed = [e for e in codegen_result["errors"] if e["arch"] == arch]
    assert not failed, "\n".join(f"{e['case']}: {e['error'][-600:]}" for e in failed)
    used = {t for k in codegen_result["kernels"] if k["arch"] == arch for t in k["cases"]}
    assert set(ran) <= used, f"cases that launched no kernel: {sorted(set(ran) - used)}"


def test_no_local_memory(codegen_result):
    bad = [f"{_name(k)}: local {k['local']} B, stack {k['stack']} B" for k in codegen_result["kernels"]
           if k["local"] or k["stack"]]
    assert not bad, "kernels spill to local memory:\n" + "\n".join(bad)


def test_registers_per_thread(codegen_result):
    bad = [f"{_name(k)}: {k['regs']} registers" for k in _gate_kernels(codegen_result) if k["regs"] > MAX_REGISTERS]
    assert not bad, f"more than {MAX_REGISTERS} registers per thread:\n" + "\n".join(sorted(bad))


def test_16_byte_accesses_when_contiguous_extent_is_a_multiple_of_8(codegen_result):
    cases = _cases(codegen_result, lambda c: c.contiguous_extent % 8 == 0)
    assert {c["layout"] for c in cases} == {"nchw", "cl"}  # both layouts are covered by this rule
    kernels = _kernels_of(codegen_result, cases)
    assert kernels
    bad = _narrower_than(kernels, 16)
    assert not bad, ("tensor accesses narrower than 16 bytes where the contiguous extent is a multiple of 8 "
                     "elements (count per thread):\n" + "\n".join(bad))


def test_raft_nchw_half_precision_at_least_8_bytes(codegen_result):
    cases = _cases(codegen_result, lambda c: (c.hidden, c.size) == RAFT and c.layout == "nchw"
                   and c.dtype in ("float16", "bfloat16"))
    assert len(cases) == 4
    kernels = _kernels_of(codegen_result, cases)
    assert kernels
    bad = _narrower_than(kernels, 8)
    assert not bad, ("tensor accesses narrower than 8 bytes at RAFT's 46x62, NCHW, half precision "
                     "(count per thread):\n" + "\n".join(bad))


def test_bias_accesses_are_few(codegen_result):
    bad = [f"{_name(k)}: {codegen.count(k, 'bias')} bias accesses" for k in _gate_kernels(codegen_result)
           if codegen.count(k, "bias") > MAX_BIAS_ACCESSES]
    assert not bad, (f"more than {MAX_BIAS_ACCESSES} bias loads per thread (biases are per row or per channel "
                     "tile, not per element):\n" + "\n".join(sorted(bad)))


def test_every_access_traced_and_tensors_moved_by_global_loads_and_stores(codegen_result):
    """A fused kernel may load its tensors by ``cp.async`` only (the
    channels_last wgrad kernel: its operand tiles go straight to shared
    memory, and it reads nothing in its epilogue); the width rules are the gate
    kernels'."""
    for k in codegen_result["kernels"]:
        assert codegen.count(k, "unknown") == 0, f"{_name(k)}: global accesses not traced to an argument"
        loads = k["accesses"].get("ld_tensor") or (codegen.is_fused(k) and k.get("cp_async"))
        assert loads and k["accesses"].get("st_tensor"), (
            f"{_name(k)}: no ld.global/st.global of a tensor: the width rules would pass vacuously")


# ----------------------------------------------------------------------------
# The fused step: a row per kernel, wgmma, no spills
# ----------------------------------------------------------------------------

#: The fused step's kernel sizes per workload compiled (RAFT's ConvGRU and SepConvGRU).
FUSED_KERNEL_SIZES = {"raft-convgru": ((3, 3),), "raft-sepconvgru": ((1, 5), (5, 1))}


def _fused_rows(result, arch=90):
    return [k for k in result["kernels"] if k["arch"] == arch and codegen.is_fused(k)]


#: RAFT's input channels (x of the one-step cell: W_ih's wgrad and d_x).
INPUT_CHANNELS = 256


def _fused_key(k):
    """(kernel, (KH, KW), layout, formulations, C, flags) of one compiled fused
    kernel: formulations the sorted ``reset_after=..`` of the cases that
    launched it (both where one build serves both), flags the sorted
    ``(name, value)`` of its SAVE, ACCUMULATE, TWO_SOURCES (and the wgrad
    kernel's HAS_BIAS) constexprs."""
    c = k["constexprs"]
    (layout,) = {t.split()[4] for t in k["cases"]}
    forms = tuple(sorted({t.split()[5] for t in k["cases"]}))
    names = ("SAVE", "ACCUMULATE", "TWO_SOURCES") + (("HAS_BIAS",) if k["kernel"] == "_conv_wgrad_kernel" else ())
    flags = tuple(sorted((n, c[n]) for n in names if n in c))
    return k["kernel"], (int(c["KH"]), int(c["KW"])), layout, forms, int(c["C"]), flags


def test_fused_step_has_a_row_per_kernel(codegen_result):
    """Forward (the inference and the saving variant) and backward, both
    formulations and layouts, each kernel size of RAFT's two cells, at N=6,
    46x62, hidden 128, bfloat16: one compiled kernel each, launched by its
    workload's case, none failed. The backward as the cell plans launch it:
    the dgrad kernels into d_h; wgrad for W_hh (reset_before: two sources, r/z
    rows from h and candidate rows from r * h, no bias; reset_after: one source
    and the bias) and for W_ih from x with the bias (one build for both
    formulations); d_x = dgrad(d_gx, W_ih) over 3H channels, written
    (ACCUMULATE=False: one build for both formulations) or, by a separable
    step's first half (1x5), added to the second's: that build is the one of
    reset_after's d_h dgrad over 3H (same constexprs and specialization)."""
    rows = _fused_rows(codegen_result)
    hidden = 128
    before, after = ("reset_after=False",), ("reset_after=True",)
    both = before + after
    first_halves = {sizes[0] for sizes in FUSED_KERNEL_SIZES.values() if len(sizes) == 2}

    def acc(value):
        return (("ACCUMULATE", value),)

    def wgrad(two, bias):
        return (("HAS_BIAS", bias), ("TWO_SOURCES", two))

    want = set()
    for sizes in FUSED_KERNEL_SIZES.values():
        for ks in sizes:
            for layout in codegen.LAYOUTS:
                want |= {("_conv_rz_fwd_kernel", ks, layout, before, hidden, ()),
                         ("_conv_dgrad_reset_gate_bwd_kernel", ks, layout, before, hidden, ()),
                         ("_conv_dgrad_bwd_kernel", ks, layout, before, 2 * hidden, acc("True")),
                         ("_conv_wgrad_kernel", ks, layout, before, hidden, wgrad("True", "False")),
                         ("_conv_wgrad_kernel", ks, layout, after, hidden, wgrad("False", "True")),
                         ("_conv_wgrad_kernel", ks, layout, both, INPUT_CHANNELS, wgrad("False", "True"))}
                if ks in first_halves:
                    want.add(("_conv_dgrad_bwd_kernel", ks, layout, both, 3 * hidden, acc("True")))
                else:
                    want |= {("_conv_dgrad_bwd_kernel", ks, layout, after, 3 * hidden, acc("True")),
                             ("_conv_dgrad_bwd_kernel", ks, layout, both, 3 * hidden, acc("False"))}
                want |= {(name, ks, layout, form, hidden, (("SAVE", save),)) for save in ("False", "True")
                         for name, form in (("_conv_n_fwd_kernel", before), ("_conv_reset_after_fwd_kernel", after))}
    got = [_fused_key(k) for k in rows]
    assert sorted(got) == sorted(want)  # each once: no kernel compiled twice, none missing
    for k in rows:
        (workload,) = {t.split()[0] for t in k["cases"]}
        sizes = FUSED_KERNEL_SIZES[workload.replace(":fused", "")]
        assert (int(k["constexprs"]["KH"]), int(k["constexprs"]["KW"])) in sizes, _name(k)
        assert " H=128 46x62 bfloat16 " in k["cases"][0], _name(k)
    failed = [e for e in codegen_result["errors"] if ":fused " in e["case"]]
    assert not failed, "\n".join(f"{e['case']}: {e['error'][-600:]}" for e in failed)


def test_fused_step_compiles_at_the_default_tiles(codegen_result):
    import torch

    from convgru_triton import _tuning

    for k in _fused_rows(codegen_result):
        tile = _tuning.default_tile(k["kernel"].strip("_")[: -len("_kernel")], torch.bfloat16)
        c = k["constexprs"]
        # The wgrad kernel's tile: BLOCK_O output channels, BLOCK_C input channels, BLOCK_P pixels.
        blocks = (("BLOCK_O", "BLOCK_C", "BLOCK_P") if k["kernel"] == "_conv_wgrad_kernel"
                  else ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        got = (*(int(c[b]) for b in blocks), k["num_warps"], k["num_stages"])
        # The tile's blocks capped at the channels or pixels (128 channels or more here: no cap).
        assert got == (tile.block_m, tile.block_n, tile.block_k, tile.num_warps, tile.num_stages), _name(k)


def test_fused_step_uses_wgmma_and_does_not_spill(codegen_result):
    rows = _fused_rows(codegen_result)
    assert rows
    no_wgmma = [_name(k) for k in rows if not k["wgmma"]]
    assert not no_wgmma, "no wgmma.mma_async in the PTX (no Hopper tensor cores):\n" + "\n".join(no_wgmma)
    spills = [f"{_name(k)}: {k['regs']} registers, stack {k['stack']} B, local {k['local']} B" for k in rows
              if k["stack"] or k["local"]]
    assert not spills, "spills to local memory:\n" + "\n".join(spills)


def test_fused_step_rows_in_the_report(codegen_result):
    """The markdown report a user reads: a fused-step table for sm_90 whose rows
    give registers, spills and wgmma, and a summary line per fused kernel."""
    text = codegen.markdown(codegen_result)
    section = text[text.index("### sm_90: the fused step"):]
    rows = [line for line in section.splitlines() if line.startswith("| conv_")]
    assert len(rows) == len(_fused_rows(codegen_result))
    header = next(line for line in section.splitlines() if line.startswith("| kernel |"))
    head = [c.strip() for c in header.strip("|").split("|")]
    for line in rows:
        cells = dict(zip(head, (c.strip() for c in line.strip("|").split("|"))))
        assert int(cells["regs"]) > 0 and cells["spills"] == "0" and int(cells["wgmma"]) > 0, line
    summary = codegen.fused_summary(codegen_result, 90)
    for name in codegen.FUSED_KERNELS:
        assert f"| {name.strip('_').replace('_kernel', '')} | " in summary


# ----------------------------------------------------------------------------
# The PTX reader, on hand-written PTX (no compiler needed)
# ----------------------------------------------------------------------------

PTX = """
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u32 k_param_1,
	.param .u64 .ptr .global .align 1 k_param_2,
	.param .u64 .ptr .global .align 1 k_param_3
)
{
	ld.param.b64 	%rd1, [k_param_0];
	ld.param.b32 	%r1, [k_param_1];
	ld.param.b64 	%rd2, [k_param_2];
	ld.param.b64 	%rd3, [k_param_3];
	mov.u32 	%r2, %tid.x;
	mad.wide.s32 	%rd4, %r2, 2, %rd1;     // x + tid
	mul.wide.s32 	%rd5, %r1, 2;
	add.s64 	%rd6, %rd2, %rd5;           // bias + row
	// begin inline asm
	@%p1 ld.global.v4.b32 { %r3, %r4, %r5, %r6 }, [ %rd4 + 0 ];
	// end inline asm
	@%p2 ld.global.L1::evict_last.b16 { %rs1 }, [ %rd6 + 0 ];
	add.s64 	%rd7, %rd3, %rd5;
	mov.b64 	%rd8, %rd7;
	st.global.v2.b32 	[%rd8+16], {%r3, %r4};
	ld.global.b16 	%rs2, [%rd4+2];
	ret;
}
"""


def test_ptx_reader_widths_and_pointers():
    acc = codegen.global_accesses(PTX, ["x_ptr", None, "bias_ptr", "out_ptr"])
    got = [(a.op, a.width, a.pointers, a.kind) for a in acc]
    assert got == [
        ("ld", 16, ("x_ptr",), "tensor"),
        ("ld", 2, ("bias_ptr",), "bias"),
        ("st", 8, ("out_ptr",), "tensor"),
        ("ld", 2, ("x_ptr",), "tensor"),
    ]


# A pointer chosen at run time between two arguments: the compiler selects the
# parameter's address and loads the pointer through it (the wgrad kernel's src/src2).
PTX_SELECTED = """
.visible .entry k(
	.param .u64 .ptr .global .align 1 k_param_0,
	.param .u64 .ptr .global .align 1 k_param_1,
	.param .u32 k_param_2
)
{
	ld.param.b32 	%r1, [k_param_2];
	setp.gt.s32 	%p1, %r1, 0;
	mov.b32 	%r2, k_param_0;
	mov.b32 	%r3, k_param_1;
	selp.b32 	%r4, %r3, %r2, %p1;
	ld.param.b64 	%rd1, [%r4];
	mul.wide.s32 	%rd2, %r1, 2;
	add.s64 	%rd3, %rd1, %rd2;
	@%p1 ld.global.b16 { %rs1 }, [ %rd3 + 0 ];
	ret;
}
"""


def test_ptx_reader_pointer_selected_through_its_parameter_address():
    (acc,) = codegen.global_accesses(PTX_SELECTED, ["src_ptr", "src2_ptr", None])
    assert (acc.op, acc.width, acc.pointers, acc.kind) == ("ld", 2, ("src2_ptr", "src_ptr"), "tensor")


def test_pointer_param_names_skip_constexprs():
    sig = {"a_ptr": "*bf16", "a_s": "constexpr", "n": "i32", "bias_ptr": "*fp32", "BLOCK": "constexpr"}
    assert codegen.pointer_param_names(sig) == ["a_ptr", None, "bias_ptr"]


@pytest.mark.parametrize("batch,hidden,size,dtype,expected", [
    (6, 128, (46, 62), "bfloat16", 2),   # 128*2852*2 B is a multiple of 16: any N alike, but not 1
    (16, 3, (5, 5), "float16", 8),       # 150 B: N divisible by 8 keeps t*N*150 16-aligned
    (4, 3, (5, 5), "float16", 4),
    (5, 3, (5, 5), "float32", 3),        # odd N: an odd stand-in
    (1, 3, (5, 5), "float32", 1),
])
def test_shrunk_batch_keeps_alignment_class(batch, hidden, size, dtype, expected):
    import math

    n = codegen.shrunk_batch(batch, hidden, size, codegen.DTYPES[dtype])
    assert n == expected
    elem = codegen.DTYPES[dtype].itemsize
    for c in (hidden, 2 * hidden, 3 * hidden):
        k = c * math.prod(size) * elem
        assert (n * k) % 16 == 0 or (batch * k) % 16 != 0
        assert (batch * k) % 16 == 0 or (n * k) % 16 != 0
