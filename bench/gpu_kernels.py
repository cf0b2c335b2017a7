"""Registers and spills of the gate kernels as the GPU itself loaded them, beside
the CPU-side prediction of :mod:`bench.codegen`.

    python -m bench.gpu_kernels [--prediction bench/results/codegen-sm90.json]   # on a CUDA machine
    python -m bench.gpu_kernels --dry-run                                          # CPU: fake sm_90 compile

On a GPU: the RAFT-size cases of :mod:`bench.codegen` (46x62, hidden 128, N=2,
2-step ConvGRU2d, forward without autograd and forward + backward, both
formulations; bfloat16 and float32, contiguous and channels_last) run through
the package on CUDA tensors; then every kernel in the caches of the package's
``@triton.jit`` functions is read: ``n_regs`` and ``n_spills`` as the driver
reported them when it loaded the kernel, and the same binary's ``cuobjdump``
resource line (what :mod:`bench.codegen` reads). Beside them, the prediction
committed in ``bench/results/codegen-sm90.json`` (compiled on a CPU, possibly
by another Triton version) for the same kernel, dtype and constexprs (the range
when several specializations match). With ``--dry-run`` (no GPU) the kernels
are compiled for a fake sm_90 instead and their "GPU" columns come from
cuobjdump: it checks this script, not a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

if __name__ == "__main__":
    # Compiled kernels on the GPU, and a fake-target compile in the dry run: never the interpreter.
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

DEFAULT_PREDICTION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "codegen-sm90.json")
SHAPE = (128, (46, 62))


def cases(dtypes: Sequence[str] = ("bfloat16", "float32"), layouts: Sequence[str] = ("nchw", "cl")):
    from . import codegen

    return codegen.shape_cases([SHAPE], dtypes, layouts)


def _jit_functions():
    """The package's ``@triton.jit`` kernels (every JITFunction in its ops modules)."""
    from triton.runtime.jit import JITFunction

    from convgru_triton.ops.gates import kernels as conv_gru_cell

    out = []
    for name in dir(conv_gru_cell):
        obj = getattr(conv_gru_cell, name)
        if isinstance(obj, JITFunction) and name.endswith("_kernel"):
            out.append(obj)
    return out


def _dtype_of(signature) -> str:
    if isinstance(signature, dict):
        values = signature.values()
    else:
        values = signature or []
    return next((t[1:] for t in values if isinstance(t, str) and t.startswith("*")), "?")


def gpu_rows(case_list) -> List[Dict]:
    """Run ``case_list`` on CUDA and read every loaded gate kernel."""
    from . import _triton_compat as tc

    for case in case_list:
        _run_on_cuda(case)
    rows = []
    for fn in _jit_functions():
        for kernel in tc.loaded_kernels(fn):
            md = kernel.metadata
            src = getattr(kernel, "src", None)
            constexprs = {}
            if src is not None and hasattr(src, "constants"):
                names = list(getattr(src, "signature", {}) or {})
                for path, v in src.constants.items():
                    i = path[0] if isinstance(path, tuple) else path
                    constexprs[names[i] if isinstance(i, int) and i < len(names) else str(path)] = str(
                        getattr(v, "value", v))
            regs = tc.gpu_registers(kernel)
            try:
                res = tc.resource_usage(kernel)
            except Exception:
                res = {}
            rows.append(dict(kernel=getattr(md, "name", fn.__name__), dtype=_dtype_of(getattr(src, "signature", None)),
                             constexprs=constexprs, num_warps=getattr(md, "num_warps", None),
                             gpu_regs=regs["regs"], gpu_spills=regs["spills"],
                             cubin_regs=res.get("regs"), cubin_stack=res.get("stack")))
    return rows


def _run_on_cuda(case) -> None:
    import convgru_triton as cg

    from .codegen import DTYPES, _layout

    dtype = DTYPES[case.dtype]
    dev = torch.device("cuda")
    gru = cg.ConvGRU2d(case.input_channels, case.hidden, case.kernel_size, reset_after=case.reset_after,
                       backend="triton", device=dev, dtype=dtype)
    x = _layout(torch.randn(case.steps, case.batch, case.input_channels, *case.size, dtype=dtype, device=dev),
                case.layout)
    with torch.no_grad():
        gru(x)
    x.requires_grad_()
    out = gru(x)[0]
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()


def dry_rows(case_list) -> List[Dict]:
    """The same rows from a fake sm_90 compile on CPU (``gpu_*`` from cuobjdump)."""
    from . import codegen

    result = codegen.run(case_list, [90], log=None)
    rows = []
    for k in result["kernels"]:
        rows.append(dict(kernel=k["kernel"], dtype=k["dtype"], constexprs=k["constexprs"], num_warps=k["num_warps"],
                         gpu_regs=k["regs"], gpu_spills=k["stack"] + k["local"], cubin_regs=k["regs"],
                         cubin_stack=k["stack"]))
    return rows


def _comparable(constexprs: Dict[str, str]) -> Dict[str, str]:
    # Arguments specialized to 1 (strides) are constexprs too; they depend on the layout, which the
    # other constexprs (CHANNELS_LAST) already say. Compare the upper-case (declared) ones only.
    return {k: v for k, v in constexprs.items() if k.isupper()}


def attach_predictions(rows: List[Dict], prediction: Optional[Dict]) -> List[Dict]:
    """Add ``pred_regs`` (``"a"`` or ``"a-b"``), ``pred_spills`` and ``pred_n`` (how many
    predicted builds matched: same kernel, dtype and declared constexprs) to each row."""
    preds = (prediction or {}).get("kernels", [])
    for r in rows:
        # Without the constexprs (a Triton that keeps no ASTSource on its kernels), match by kernel and
        # dtype alone: the range then spans every variant.
        mine = _comparable(r["constexprs"])
        match = [p for p in preds if p["kernel"] == r["kernel"] and (r["dtype"] == "?" or p["dtype"] == r["dtype"])
                 and (not mine or _comparable(p["constexprs"]) == mine)]
        r["pred_n"] = len(match)
        if match:
            regs = sorted({p["regs"] for p in match})
            spills = sorted({p["stack"] + p["local"] for p in match})
            r["pred_regs"] = str(regs[0]) if len(regs) == 1 else f"{regs[0]}-{regs[-1]}"
            r["pred_spills"] = str(spills[0]) if len(spills) == 1 else f"{spills[0]}-{spills[-1]}"
        else:
            r["pred_regs"] = r["pred_spills"] = "—"
    return rows


def markdown(rows: List[Dict], prediction: Optional[Dict], dry_run: bool) -> str:
    meta = (prediction or {}).get("meta", {})
    src = (f"prediction: `bench/results/codegen-sm90.json` (Triton {meta.get('triton', '?')}, "
           f"commit {str(meta.get('commit', '?'))[:12]})" if prediction else "no prediction file")
    lines = ["Registers and spills per thread of the gate kernels as " +
             ("compiled for a fake sm_90 (**dry run**, no GPU)" if dry_run else "the GPU loaded them") +
             f", RAFT's 46×62, hidden 128; {src}.", "",
             "| kernel | variant | dtype | warps | GPU regs | GPU spills | cubin regs | cubin stack B | "
             "predicted regs | predicted spills B |",
             "|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["dtype"], sorted(_comparable(r["constexprs"]).items()))):
        variant = " ".join(f"{k}={v}" for k, v in _comparable(r["constexprs"]).items() if k != "COMPUTE")
        lines.append("| " + " | ".join(str(x) for x in [
            r["kernel"].strip("_").replace("_kernel", ""), variant, r["dtype"], r["num_warps"],
            r["gpu_regs"], r["gpu_spills"], r["cubin_regs"], r["cubin_stack"], r["pred_regs"], r["pred_spills"]]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--prediction", default=DEFAULT_PREDICTION)
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--layouts", default="nchw,cl")
    p.add_argument("--dry-run", action="store_true", help="no GPU: compile for a fake sm_90 on the CPU")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    cs = cases([d for d in args.dtypes.split(",") if d], [x for x in args.layouts.split(",") if x])
    try:
        with open(args.prediction) as f:
            prediction = json.load(f)
    except (OSError, ValueError) as exc:
        print(f"no prediction ({exc}); printing the GPU side only", file=sys.stderr)
        prediction = None
    if args.dry_run:
        from . import _triton_compat as tc

        error = tc.nvidia_backend_error()
        if error:
            print(f"error: {error}", file=sys.stderr)
            return 3
        rows = dry_rows(cs)
    else:
        if not torch.cuda.is_available():
            print("error: needs a CUDA GPU (use --dry-run to check the script on a CPU)", file=sys.stderr)
            return 2
        rows = gpu_rows(cs)
    attach_predictions(rows, prediction)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown(rows, prediction, args.dry_run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
