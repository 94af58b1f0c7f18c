"""Compile every shipped Triton kernel configuration for real GPUs, without a GPU.

    python -m bench.compile [--targets 90,80] [--jobs N] [--only SUBSTRING[|SUBSTRING]] [--json FILE] [--details]

Every op module in ``kernels`` exposes ``compile_specs()``: each kernel at each
launch configuration its launchers can choose. Each is built by Triton's real
compiler (TTIR -> PTX -> cubin) for ``GPUTarget("cuda", cc, 32)``, and the
cubin is read back with the ``cuobjdump`` that ships in the Triton wheel:
registers, spills (local memory / stack), shared memory, and whether the
tensor-core instructions are used (HGMMA, the warpgroup MMA, on sm_90; HMMA on
sm_80). Exit status 1 when a configuration fails to compile, a hot kernel
spills, or a kernel needs more shared memory than the target gives one block
(:data:`MAX_SHARED_BYTES`: it could never launch).

``--details`` also prints what the SASS says about how a kernel feeds the tensor
cores (:func:`sass_facts`): TMA loads and stores (UTMALDG/UTMASTG) against
``cp.async`` (LDGSTS), warp specialization (the TTGIR's ``ttg.warp_specialize``
and the SASS's register rebalancing, USETMAXREG), each HGMMA shape with where its
A operand comes from (``rs``: registers, ``ss``: shared memory), the wgmma wait
depths (``WARPGROUP.DEPBAR.LE gsb0, N``: N groups left in flight), and per key
loop (each innermost loop with tensor-core instructions, :func:`key_loops`; two
where a kernel runs an unmasked and a masked loop, or a warp-specialized one two
consumer partitions) its instructions, MUFU.EX2 (exponentials per key tile) and the
compares, selects and max/min of its masking and softmax. A compiler report, not a
measurement.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels

try:  # Gluon kernels (kernels._attention_gluon) compile from their own AST source
    from triton.experimental.gluon._runtime import GluonASTSource
except ImportError:  # pragma: no cover - a Triton without Gluon ships no Gluon specs
    GluonASTSource = None

_SPECS: list = []  # filled before the worker pool forks


def _is_bf16(spec) -> bool:
    return any(t == "*bf16" or t.startswith("tensordesc<bf16") for t in spec.signature.values()) or not any(
        t in ("*fp16", "*fp32") for k, t in spec.signature.items() if k.isupper()
    )


def collect_specs(only: str | None = None, quick: bool = False) -> list:
    """All KernelSpecs of all op modules in ``kernels``, in module order.

    ``quick`` keeps the bf16 variants only (the training dtype: the fp16 ones
    share their tiles, the fp32 ones are correctness paths), and drops specs an op
    marks ``extra["quick"] = False`` (e.g. attention head dims other than 64/128).
    """
    specs = []
    for info in sorted(pkgutil.iter_modules(kernels.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.ispkg:
            continue
        module = importlib.import_module(f"kernels.{info.name}")
        for spec in getattr(module, "compile_specs", lambda: [])():
            if (only is None or any(o in spec.name or o in spec.describe() for o in only.split("|"))) and (not quick or (_is_bf16(spec) and spec.extra.get("quick", True))):
                specs.append(spec)
    return specs


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def sass_facts(sass: str, ttgir: str = "") -> dict:
    """How one cubin's SASS feeds the tensor cores: TMA, warp specialization, HGMMA shapes, waits, the main loop."""
    code = [(int(a, 16), ins.strip()) for a, ins in _SASS_LINE.findall(sass)]
    ops = [ins.split()[1] if ins.startswith("@") else ins.split()[0] for _, ins in code]

    def count(prefix, lines=ops):
        return sum(op.startswith(prefix) for op in lines)

    hgmma = {}
    for (_, ins), op in zip(code, ops):
        if op.startswith("HGMMA."):
            args = ins.split(None, 2 if ins.startswith("@") else 1)[-1].split(",")  # dest, A, B, C
            shape = op.split(".")[1]
            source = "ss" if "gdesc" in args[1] else "rs"  # A from shared memory or registers
            hgmma[f"{shape}{source}"] = hgmma.get(f"{shape}{source}", 0) + 1
    waits = sorted({int(w, 16) for w in re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", sass)})
    loops = key_loops(code, ops)
    main = max(loops, key=lambda loop: (loop["hgmma"] + loop["hmma"], -loop["instructions"]), default=None)
    return {
        "utmaldg": count("UTMALDG"), "utmastg": count("UTMASTG"), "ldgsts": count("LDGSTS"),
        "warp_specialized": "ttg.warp_specialize" in ttgir,
        "setmaxnreg": sorted({int(v, 16) for v in re.findall(r"USETMAXREG\S* (?:\w+, )?(0x[0-9a-f]+)", sass)}),
        "hgmma": hgmma, "hmma": count("HMMA."), "wgmma_waits": waits,
        "main_loop_instructions": main["instructions"] if main else 0, "main_loop_ex2": main["ex2"] if main else 0,
        "main_loop_hgmma": main["hgmma"] if main else 0, "loops": loops,
    }


def key_loops(code: list[tuple[int, str]], ops: list[str]) -> list[dict]:
    """The innermost loops that run tensor-core instructions, in address order, with what one iteration issues.

    A loop is a branch back to an earlier address whose span holds no unconditional EXIT:
    the out-of-line retry blocks of the TMA/mbarrier waits (``SYNCS...TRYWAIT``; ``@!P0 BRA``
    to a block past the kernel's EXIT, which branches back into the loop) are not loops, and
    counting them as such gave one "loop" spanning every key loop between the wait and the end.
    Per loop: its instructions, HGMMA, HMMA and MUFU.EX2; ``branched``, the instructions in
    blocks a forward branch inside the loop can jump over (e.g. a boundary tile's mask, which
    interior tiles skip); and on the path every iteration runs (outside those blocks) the
    integer compares (ISETP), selects (FSEL/SEL) and float max/min (FMNMX): what masking and
    the online softmax cost every key tile.
    """
    index = {addr: i for i, (addr, _) in enumerate(code)}

    def target(ins):
        m = re.search(r"\bBRA (?:\S+ )?(0x[0-9a-f]+)", ins)
        return index.get(int(m.group(1), 16)) if m else None

    spans = [(t, i) for i, (_, ins) in enumerate(code) if (t := target(ins)) is not None and t <= i
             and not any(code[j][1] == "EXIT" for j in range(t, i + 1))]
    with_mma = [(f, l) for f, l in spans if any(op.startswith(("HGMMA.", "HMMA.")) for op in ops[f:l + 1])]
    innermost = [(f, l) for f, l in with_mma if not any((f, l) != (g, k) and f <= g and k <= l for g, k in with_mma)]
    loops = []
    for f, l in sorted(set(innermost)):
        branched = {j for i in range(f, l) if (t := target(code[i][1])) is not None and i < t <= l
                    for j in range(i + 1, t)}
        every = [op for j, op in enumerate(ops[f:l + 1], f) if j not in branched]

        def count(prefix, body):
            return sum(op.startswith(prefix) for op in body)

        body = ops[f:l + 1]
        loops.append({"start": f"{code[f][0]:#x}", "instructions": len(body), "branched": len(branched),
                      "hgmma": count("HGMMA.", body), "hmma": count("HMMA.", body), "ex2": count("MUFU.EX2", body),
                      "isetp": count("ISETP", every), "sel": count(("FSEL", "SEL"), every),
                      "fmnmx": count("FMNMX", every)})
    return loops


def describe_facts(f: dict) -> str:
    """One line of :func:`sass_facts` for the table."""
    load = f"TMA {f['utmaldg']}ld/{f['utmastg']}st" if f["utmaldg"] or f["utmastg"] else f"LDGSTS {f['ldgsts']}"
    ws = f"WS setmaxnreg {f['setmaxnreg']}" if f["warp_specialized"] else "no-WS"
    mma = ",".join(f"{k}x{n}" for k, n in sorted(f["hgmma"].items())) or (f"HMMA x{f['hmma']}" if f["hmma"] else "-")
    loops = " | ".join(f"{n['instructions']} ins ({n['branched']} branched), {n['hgmma'] or n['hmma']} "
                       f"{'hgmma' if n['hgmma'] else 'hmma'}, {n['ex2']} ex2; every tile {n['isetp']} isetp, "
                       f"{n['sel']} sel, {n['fmnmx']} fmnmx" for n in f["loops"])
    return f"{load}; {ws}; {mma}; waits {f['wgmma_waits']}; {'loops' if len(f['loops']) > 1 else 'loop'} {loops or '-'}"


def _compile_one(job: tuple[int, int]) -> dict:
    index, cc = job
    spec = _SPECS[index]
    row = {"kernel": spec.name, "config": spec.describe(), "target": f"sm_{cc}", "hot": spec.hot}
    # Hints Triton's launcher attaches to aligned arguments: without them the compiler
    # sees scalar loads and reports registers the launched kernel does not use.
    arg_index = spec.kernel.arg_names.index
    attrs = {(arg_index(a),): [["tt.divisibility", 16]] for a in spec.extra.get("divisible_by_16", ())}
    start = time.perf_counter()
    source = GluonASTSource if getattr(spec.kernel, "is_gluon", lambda: False)() else ASTSource
    try:
        compiled = triton.compile(
            source(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs),
            target=GPUTarget("cuda", cc, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
    except Exception as e:  # a configuration that does not build is the finding
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
        return row
    row["compile_s"] = round(time.perf_counter() - start, 2)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
        row["regs"] = int(fields.get("REG", -1))
        row["spill_bytes"] = int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0))
        sass = subprocess.run([_cuobjdump(), "--dump-sass", f.name], capture_output=True, text=True).stdout
        row["tensor_cores"] = "HGMMA" if "HGMMA" in sass else "HMMA" if "HMMA" in sass else ""
        row["sass"] = sass_facts(sass, compiled.asm.get("ttgir", ""))
    row["shared_bytes"] = int(compiled.metadata.shared)
    return row


def run(targets: list[int], jobs: int, only: str | None, quick: bool = False) -> list[dict]:
    _SPECS[:] = collect_specs(only, quick)
    # A spec may name the targets whose launchers can choose it (e.g. Hopper-only tiles).
    work = [(i, cc) for i, spec in enumerate(_SPECS) for cc in targets if cc in spec.extra.get("targets", (cc,))]
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(jobs) as pool:
        return pool.map(_compile_one, work, chunksize=4)


# The most shared memory one block may use, in bytes (CUDA's per-block opt-in limit,
# CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: 227 KB on sm_90, 163 KB on sm_80).
# Triton's launcher compares a kernel's ``shared`` with it and raises OutOfResources; the
# autotuner then drops the candidate, so a config over it never runs. (sm_86/sm_89 allow 99 KB.)
MAX_SHARED_BYTES = {90: 232448, 80: 166912}


def failures(rows: list[dict]) -> list[str]:
    """Configurations that do not compile, hot ones that spill, and any over the target's shared memory."""
    bad = []
    for r in rows:
        if "error" in r:
            bad.append(f"{r['kernel']} {r['config']} {r['target']}: does not compile: {r['error']}")
            continue
        if r["hot"] and r["spill_bytes"] > 0:
            bad.append(f"{r['kernel']} {r['config']} {r['target']}: spills {r['spill_bytes']} bytes")
        limit = MAX_SHARED_BYTES.get(int(r["target"].removeprefix("sm_")))
        if limit is not None and r.get("shared_bytes", 0) > limit:
            bad.append(f"{r['kernel']} {r['config']} {r['target']}: needs {r['shared_bytes']} bytes of shared "
                       f"memory, over {r['target']}'s {limit} (OutOfResources at launch)")
    return bad


def print_details(rows: list[dict]) -> None:
    """One line per configuration and target: :func:`describe_facts`."""
    for r in rows:
        if "sass" in r:
            print(f"{r['kernel']:<28} {r['config']:<96} {r['target']} regs {r['regs']:>3} spill {r['spill_bytes']}: "
                  f"{describe_facts(r['sass'])}")


def print_table(rows: list[dict]) -> None:
    targets = sorted({r["target"] for r in rows}, reverse=True)
    by_config: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        by_config.setdefault((r["kernel"], r["config"]), {})[r["target"]] = r
    head = f"{'kernel':<28} {'config':<96}" + "".join(f" | {t:>6} regs spill  smem  mma " for t in targets)
    print(head)
    print("-" * len(head))
    for (kernel, config), per_target in by_config.items():
        line = f"{kernel:<28} {config:<96}"
        for t in targets:
            r = per_target.get(t, {})
            if "error" in r:
                line += f" | {'FAILED TO COMPILE':>31} "
            else:
                line += f" | {'':>6} {r.get('regs', ''):>4} {r.get('spill_bytes', ''):>5} {r.get('shared_bytes', ''):>5} {r.get('tensor_cores', '') or '-':>5}"
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="90,80", help="compute capabilities, comma-separated (default 90,80)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--only", default=None,
                        help="only kernels whose name or config contains this ('a|b': either)")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this file")
    parser.add_argument("--quick", action="store_true", help="the test suite's subset: bf16, attention at head dims 64 and 128")
    parser.add_argument("--quiet", action="store_true", help="print only the summary and failures")
    parser.add_argument("--details", action="store_true",
                        help="also print, per configuration, TMA, warp specialization, HGMMA shapes, waits, main loop")
    args = parser.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",") if t.strip()]
    start = time.perf_counter()
    rows = run(targets, max(1, args.jobs), args.only, args.quick)
    if not args.quiet:
        print_table(rows)
    if args.details:
        print_details(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": rows}, f, indent=1)
    bad = failures(rows)
    kernels_n = len({r["kernel"] for r in rows})
    print(
        f"\ntriton {triton.__version__}: compiled {len(rows)} kernel configurations ({kernels_n} kernels, "
        f"targets {', '.join('sm_%d' % t for t in targets)}) in {time.perf_counter() - start:.0f}s; "
        f"{len(bad)} failure(s)"
    )
    for line in bad:
        print("FAIL", line)
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Kernels decorated under the interpreter cannot be compiled: start again without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "bench.compile", *sys.argv[1:]], env)
    sys.exit(main())
