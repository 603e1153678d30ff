"""Run Triton kernels on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``), in a fresh subprocess.

Triton reads ``TRITON_INTERPRET`` when it is first imported, so the interpreted code runs in its own process:
one per test module, running many checks (importing torch + triton costs ~3 s a process).

Parent side (a test module)::

    from triton_interp import run_interpreted
    res = run_interpreted("import triton_interp_checks as c; c.run_groups(['w8a8'])")
    res["checks"]   # [{"group", "check", "ok", **info}, ...] in the order recorded
    res["error"]    # traceback text if ``code`` raised outside a group (None otherwise)

Child side (inside ``code``; ``tests/`` is on ``sys.path``)::

    from triton_interp import group, record, rel, interp_cast
    with group("lora_epilogue"):           # tags the records; an exception becomes a failed check (traceback kept)
        y = my_kernel_launch(...)          # CPU torch tensors: the interpreter runs the @triton.jit body in numpy
        record("lora_w8a8", rel(y, want) <= 2**-7, m=5, rel=rel(y, want))

To add kernel checks, write a ``check_*`` function in ``triton_interp_checks`` and list it in its ``GROUPS``:
``tests/test_triton_interpreter.py`` runs every group in its one subprocess and asserts each has checks and none
failed. ``interp_cast`` gives what the interpreter stores for an fp32 value cast to a narrower dtype (it differs
from the GPU for bf16 and fp8: see ``interp_cast`` and ``triton_interp_checks.check_interpreter_limitations``).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

TESTS_DIR = Path(__file__).resolve().parent
TIMEOUT_S = 600

_DRIVER = ("import sys; sys.path.insert(0, sys.argv[3]); import triton_interp; "
           "triton_interp._child_main(sys.argv[1], sys.argv[2])")


def run_interpreted(code: str, *, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """Execute ``code`` in a new Python process with ``TRITON_INTERPRET=1``; return its recorded checks.

    Returns ``{"checks": [...], "error": str | None, "workarounds": [...], "group_seconds": {...},
    "seconds": float, "versions": {...}, "returncode": int, "stderr_tail": str}``. Raises RuntimeError (with
    the child's output) if the process dies before writing its results, subprocess.TimeoutExpired past
    ``timeout_s``.
    """
    # MALLOC_PERTURB_: glibc fills every allocation with 0x5A bytes, so an output element a kernel never writes
    # (torch.empty) reads as 1.5e16 / 90 and fails the comparisons (the GPU checks fill free memory with NaN)
    env = dict(os.environ, TRITON_INTERPRET="1", MALLOC_PERTURB_="165")
    with tempfile.TemporaryDirectory(prefix="cq-interp-") as tmp:
        out = Path(tmp) / "results.json"
        proc = subprocess.run([sys.executable, "-c", _DRIVER, code, str(out), str(TESTS_DIR)], env=env,
                              capture_output=True, text=True, timeout=timeout_s, cwd=tmp)
        if not out.is_file():
            raise RuntimeError(f"interpreted run wrote no results (exit {proc.returncode}):\n"
                               f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        res = json.loads(out.read_text())
    res["returncode"], res["stderr_tail"] = proc.returncode, proc.stderr[-4000:]
    return res


def run_groups_in_parallel(shares: list[list[str]], *, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """``triton_interp_checks``' groups in one interpreted process per share, all at once (the interpreter is one
    CPU core's work and pytest waits on it: CI's two cores run two shares in about half the time); the results
    merged as :func:`run_interpreted` returns them, ``group_seconds`` in the shares' order."""
    from concurrent.futures import ThreadPoolExecutor

    codes = [f"import triton_interp_checks as c; c.run_groups({names!r})" for names in shares if names]
    with ThreadPoolExecutor(len(codes)) as pool:
        parts = list(pool.map(lambda code: run_interpreted(code, timeout_s=timeout_s), codes))
    errors = [p["error"] for p in parts if p["error"] is not None]
    workarounds: list[str] = []
    for p in parts:
        workarounds += [w for w in p["workarounds"] if w not in workarounds]
    return {"checks": [c for p in parts for c in p["checks"]], "error": "\n".join(errors) if errors else None,
            "workarounds": workarounds, "group_seconds": {g: t for p in parts for g, t in p["group_seconds"].items()},
            "seconds": max(p["seconds"] for p in parts), "versions": parts[0]["versions"],
            "returncode": next((p["returncode"] for p in parts if p["returncode"]), 0),
            "stderr_tail": "\n".join(p["stderr_tail"] for p in parts)[-4000:]}


def balanced_shares(names: list[str], seconds: dict[str, float], n: int) -> list[list[str]]:
    """``names`` in ``n`` shares of about equal total ``seconds`` (heaviest first into the lightest share; a name
    without a figure counts the median one), each share in ``names``' order."""
    known = sorted(seconds.values())
    default = known[len(known) // 2] if known else 1.0
    loads, shares = [0.0] * n, [[] for _ in range(n)]
    for name in sorted(names, key=lambda g: -seconds.get(g, default)):
        i = loads.index(min(loads))
        loads[i] += seconds.get(name, default)
        shares[i].append(name)
    order = {g: i for i, g in enumerate(names)}
    return [sorted(s, key=order.__getitem__) for s in shares]


# ---- child side ------------------------------------------------------------------------------------------------
_STATE: dict[str, Any] = {"group": None, "checks": [], "workarounds": [], "group_seconds": {}}


def record(check: str, ok: bool, **info: Any) -> None:
    """Record one check of the current :func:`group` (info: JSON-able numbers/strings describing it)."""
    clash = {"group", "check", "ok"} & set(info)
    if clash:
        raise ValueError(f"record({check!r}): info keys {sorted(clash)} are reserved")
    _STATE["checks"].append({"group": _STATE["group"], "check": check, "ok": bool(ok), **info})


def record_refused(check: str, call: Callable[[], object]) -> None:
    """Record ``check`` as passed when ``call()`` raises ValueError (an input the function must refuse), failed
    when it returns; any other exception propagates (the group records it)."""
    try:
        call()
    except ValueError:
        record(check, True)
        return
    record(check, False)


@contextlib.contextmanager
def group(name: str) -> Iterator[None]:
    """Tag the checks recorded inside with ``name``; an exception is recorded as a failed check (with its
    traceback) and the run goes on with the next group."""
    prev, _STATE["group"] = _STATE["group"], name
    t0 = time.perf_counter()
    try:
        yield
    except Exception as e:
        record("exception", False, error=f"{type(e).__name__}: {e}"[:2000], traceback=traceback.format_exc()[-6000:])
    finally:
        _STATE["group_seconds"][name] = round(time.perf_counter() - t0, 3)
        _STATE["group"] = prev


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def code_diff(q: torch.Tensor, qr: torch.Tensor) -> tuple[int, int, bool]:
    """(largest |difference|, how many differ, within the rotation bound) of two int8 code tensors: fp32 sums in
    another order may move a code by 1 at a .5 tie, on <= 0.1% of codes (+1)."""
    d = (q.int() - qr.int()).abs()
    n = int((d > 0).sum())
    return int(d.max()), n, bool(d.max() <= 1 and n <= q.numel() // 1000 + 1)


def interp_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What a kernel stores, under the interpreter, for the float32 values ``t`` cast to ``dtype``.

    float32/float16 (and integral values to int8): the usual round-to-nearest-even cast, as on the GPU. bfloat16
    and fp8 go through the interpreter's own bit-level converter, which differs from the GPU's: fp32 -> bf16
    truncates toward zero, and fp32 -> fp8 rounds half away from zero and loses the carry into the exponent
    when that exponent is odd (124.3 -> 64 in e4m3fn; the GPU gives 128). Using it as the oracle checks
    everything a kernel computes except that final conversion, which the GPU checks cover.
    """
    import numpy as np
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import _convert_float

    t = t.float().contiguous()
    if dtype in (torch.float32, torch.float16, torch.int8, torch.int32):
        return t.to(dtype)
    # (triton dtype, rounding mode the interpreter passes: None for .to(bf16) (fp_trunc), RTNE for fp8, bits)
    target = {torch.bfloat16: (tl.bfloat16, None, np.int16),
              torch.float8_e4m3fn: (tl.float8e4nv, ir.ROUNDING_MODE.RTNE, np.int8),
              torch.float8_e5m2: (tl.float8e5, ir.ROUNDING_MODE.RTNE, np.int8)}.get(dtype)
    if target is None:
        raise ValueError(f"interp_cast: no interpreter cast to {dtype}")
    tl_dtype, rounding, bits = target
    out = _convert_float(t.numpy(), tl.float32, tl_dtype, rounding)
    return torch.from_numpy(np.ascontiguousarray(out).view(bits).reshape(t.shape).copy()).view(dtype)


def _numpy_index_workaround() -> str | None:
    """Triton 3.6.0's interpreter converts a scalar argument used as an index (``range(K // BLOCK)``) with
    ``int(array_of_one)``, which NumPy >= 2.4 refuses (triton-lang/triton#9171, fixed upstream by #9172, after
    3.6.0). Probe it; if it fails, make ``__index__`` take the one element explicitly (the upstream fix)."""
    import triton
    import triton.language as tl
    import triton.runtime.interpreter as interp

    @triton.jit
    def probe(out_ptr, n):
        acc = 0
        for _ in range(n):
            acc += 1
        tl.store(out_ptr, acc)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        probe[(1,)](out, 3)
        return None
    except Exception as e:
        if "only 0-dimensional arrays" not in str(e):
            raise
    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    probe[(1,)](out, 3)
    if int(out) != 3:
        raise RuntimeError(f"interpreter index workaround: probe loop ran {int(out)} times, not 3")
    return "triton#9171: interpreter __index__ patched for numpy>=2.4 (int() of a 1-element array)"


def _fused_fma_workaround() -> str | None:
    """Triton's interpreter computes ``tl.fma(x, y, z)`` as ``x * y + z`` in the operands' dtype: two roundings,
    where the GPU's FMA rounds once (the activation kernels' division correction relies on it). Probe it; if the
    product is rounded, compute the float32 FMA in float64 (the product of two float32 values is exact there)
    and round the sum once to float32 (a double rounding only when the float64 sum lands on a float32 tie)."""
    import numpy as np
    import triton
    import triton.language as tl
    import triton.runtime.interpreter as interp

    @triton.jit
    def probe(a_ptr, out_ptr):
        a = tl.load(a_ptr)
        tl.store(out_ptr, tl.fma(a, a, -1.0))

    a = torch.tensor([1.0 + 2.0 ** -12], dtype=torch.float32)  # a*a - 1 = 2^-11 + 2^-24: lost if a*a rounds
    out = torch.zeros(1, dtype=torch.float32)
    probe[(1,)](a, out)
    if float(out) == 2.0 ** -11 + 2.0 ** -24:
        return None
    builder = interp.InterpreterBuilder

    def create_fma(self, x, y, z):
        if z.data.dtype != np.float32:
            return interp.TensorHandle(x.data * y.data + z.data, z.dtype.scalar)
        f64 = x.data.astype(np.float64) * y.data.astype(np.float64) + z.data.astype(np.float64)
        return interp.TensorHandle(f64.astype(np.float32), z.dtype.scalar)

    builder.create_fma = create_fma
    probe[(1,)](a, out)
    if float(out) != 2.0 ** -11 + 2.0 ** -24:
        raise RuntimeError(f"interpreter fma workaround: probe gave {float(out)!r}")
    return "interpreter tl.fma rounds twice: patched to one rounding (float64 product and sum, then float32)"


def _child_main(code: str, out_path: str) -> None:
    t0 = time.perf_counter()
    error = None
    try:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("the interpreted child needs TRITON_INTERPRET=1 in its environment")
        import numpy as np
        import triton

        _STATE["versions"] = {"triton": triton.__version__, "torch": torch.__version__, "numpy": np.__version__}
        for workaround in (_numpy_index_workaround, _fused_fma_workaround):
            fix = workaround()
            if fix:
                _STATE["workarounds"].append(fix)
        torch.manual_seed(0)
        exec(compile(code, "<interpreted>", "exec"), {"__name__": "__interpreted__"})
    except Exception:
        error = traceback.format_exc()[-8000:]
    res = {"checks": _STATE["checks"], "error": error, "workarounds": _STATE["workarounds"],
           "group_seconds": _STATE["group_seconds"], "versions": _STATE.get("versions", {}),
           "seconds": round(time.perf_counter() - t0, 3)}
    Path(out_path).write_text(json.dumps(res, default=str))
