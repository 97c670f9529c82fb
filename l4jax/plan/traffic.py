"""HBM traffic estimated from an optimized program: what its kernels read and write.

Each kernel (a fusion, a custom call, an unfused op) reads its operands from HBM and writes its result there; the
estimate is the sum of those bytes over the kernels of a computation. It ignores caches (an operand two kernels
read is counted twice, as HBM would see it without L2 hits) and counts a kernel that updates a buffer in place (a
fusion whose root is a dynamic-update-slice: a KV cache write) by its other operands only, since it touches just
the slice it writes. For a decode loop, the loop body's figure is the traffic of one token.
"""

from __future__ import annotations

import re

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
             "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "call", "conditional",
                "after-all", "partition-id", "replica-id", "copy-done", "all-reduce-done", "all-gather-done",
                "collective-permute-done", "async-done", "opt-barrier"}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape, tuples included: 'bf16[32,8,2048,128]{3,2,1,0}' or '(s32[], f32[4])'."""
    total = 0
    for dtype, dims in _SHAPE.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _ITEMSIZE.get(dtype, 4)
    return total


def computations(hlo: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines ('ENTRY' for the entry computation)."""
    out: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$", line)
        if head:
            name = "ENTRY" if head.group(1) else head.group(2)
            out[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None and line.strip():
            out[name].append(line)
    return out


def _operands(rest: str) -> list[str]:
    """Operand names of an instruction, from the text after its opening parenthesis."""
    depth, args = 1, []
    for i, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            args = re.findall(r"%([\w.\-]+)", rest[:i])
            break
    return args


def _fused(comps: dict[str, list[str]], line: str) -> list[str]:
    called = re.search(r"calls=%([\w.\-]+)", line)
    return comps.get(called.group(1), []) if called else []


def _in_place(body: list[str]) -> bool:
    """A fused computation whose root updates one of its operands in place (a dynamic-update-slice)."""
    return any(ln.lstrip().startswith("ROOT") and " dynamic-update-slice(" in ln for ln in body)


def _sliced_reads(body: list[str]) -> dict[int, int]:
    """Parameter number -> bytes read, for the parameters of a fused computation used only as what a
    dynamic-slice or gather reads from (the bytes of the slices, not of the whole operand)."""
    params, uses, sliced = {}, {}, {}
    for ln in body:
        m = _INSTRUCTION.match(ln)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        if op == "parameter":
            params[name] = int(re.match(r"(\d+)", rest).group(1))
            continue
        for i, a in enumerate(_operands(rest)):
            if a in params:
                uses.setdefault(a, []).append(op in ("dynamic-slice", "gather") and i == 0)
                if op in ("dynamic-slice", "gather") and i == 0:
                    sliced[a] = sliced.get(a, 0) + shape_bytes(shape)
    return {params[a]: sliced[a] for a, u in uses.items() if all(u)}


def traffic(hlo: str, computation: str = "ENTRY") -> int:
    """Estimated HBM bytes the kernels of ``computation`` read and write (loop bodies it calls not included)."""
    comps = computations(hlo)
    sizes: dict[str, int] = {}
    total = 0
    for line in comps.get(computation, []):
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, op, rest = m.groups()
        sizes[name] = shape_bytes(shape)
        if op in _NOT_KERNELS or op.endswith("-start"):
            continue
        reads = [sizes.get(a, 0) for a in _operands(rest)]
        body = _fused(comps, line) if op == "fusion" else []
        for i, n in _sliced_reads(body).items():
            reads[i] = n
        if op == "dynamic-update-slice" or _in_place(body):
            total += sum(reads) - max(reads, default=0)  # the updated buffer is neither read nor written whole
        else:
            total += sum(reads) + sizes[name]
    return total


def loop_body(hlo: str) -> str | None:
    """The body of the entry computation's first while loop (the decode loop), if it has one."""
    for line in computations(hlo).get("ENTRY", []):
        if " while(" in line:
            m = re.search(r"body=%([\w.\-]+)", line)
            return m.group(1) if m else None
    return None
