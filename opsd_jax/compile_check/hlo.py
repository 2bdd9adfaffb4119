"""What a compiled program's HLO text says: its collectives and matmul FLOPs, loop bodies scaled by trip counts.

XLA's own `cost_analysis()` counts a `while` body once. Here every computation gets the number of times
one run of the program executes it: the sum over its call sites of the caller's count times the trip
count of the calling `while` (`known_trip_count` in its backend config, else read from a `counter < limit`
condition, the counter's start in the initial carry and its step in the body; a loop without one, such as the
decode loop that stops at EOS, counts once, as one iteration). A collective's bytes are those of its
largest buffer (the gathered result of an all-gather, the full operand of a reduce-scatter or an
all-reduce): the data volume it spreads over the chips; a combined one (XLA's combiners make tuples of
several) counts each of its buffers.

`loop_hbm_bytes` is what one iteration of a loop reads from and writes to HBM. XLA's "bytes accessed"
is no measure of that: it counts every operand and result of every instruction wherever it lives,
including the TPU's on-chip memory (a layout's `S(1)`: weights the scheduler prefetches there are
counted when copied in, when copied out and when read), a whole embedding table for a gather of a few
rows, and a whole KV cache for the in-place write of one token. Here only buffers in memory space 0
(HBM) count; an in-place dynamic-update-slice counts its update, a gather or dynamic slice what it takes.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

# libtpu's own custom calls that XLA's TPU cost model does not price: it adds -1 s to `optimal_seconds` for each
# one as its cost analysis counts instructions (each loop body once). Measured on v5e: one layer's attention over
# 2,304 keys compiled alone gives -0.99979 s with one `ConcatBitcast` (a concatenation of slices into one buffer)
# and -2.99925 s forward and backward with three; every 3B micro-batch program had them, so no time was reported.
UNPRICED_CUSTOM_CALLS = ("ConcatBitcast",)
# A Pallas (Mosaic) kernel's custom call: the cost model prices it at about nothing when the kernel gives no cost
# estimate (JAX's splash attention gives none), and counts none of its FLOPs.
PALLAS_CUSTOM_CALL = "tpu_custom_call"
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute", "ragged-all-to-all")
_DTYPE_BYTES = {
    "pred": 1,
    "s2": 0.25,
    "u2": 0.25,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "f8e4m3": 1,
    "f8e4m3b11fnuz": 1,
    "f8e4m3fnuz": 1,
    "f8e5m2fnuz": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
    "c64": 8,
    "c128": 16,
}
# An array type with its layout, `bf16[448,18944]{1,0:T(8,128)(2,1)S(1)}`: `S(n)` names a memory space other
# than HBM (space 0).
_ARRAY = re.compile(r"\b(" + "|".join(sorted(_DTYPE_BYTES, key=len, reverse=True)) + r")\[([\d,]*)\](\{[^}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_CALLEE = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_CALLEE_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_DIM_LABELS = re.compile(r"dim_labels=([\w]+)_([\w]+)->([\w]+)")


def shape_bytes(dtype: str, dims: str) -> float:
    return _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of COLLECTIVES ("-start" / "-done" halves are counted once, as their kind)
    bytes: float  # the data it moves: its largest buffer, the sum of a combined (tuple) collective's
    executions: int  # per run of the program (trip counts applied)
    in_loop: bool  # inside a while body


@dataclasses.dataclass(frozen=True)
class HloSummary:
    collectives: list[Collective]
    # Matmul FLOPs that XLA's cost analysis leaves out because it counts a loop body once: each computation's dots
    # and convolutions times its executions per run (trip counts of known loops multiplied, nested ones too) less
    # the once XLA counts it.
    uncounted_loop_flops: float
    loops: list[tuple[str, int | None]]  # (body computation, known trip count or None)
    loop_hbm_bytes: dict[str, float]  # body computation -> HBM bytes read and written by one iteration
    # `UNPRICED_CUSTOM_CALLS` instructions as XLA's cost analysis counts them (each loop body once): the seconds
    # its cost model took off `optimal_seconds` for them.
    unpriced_custom_calls: int = 0
    pallas_kernel_calls: int = 0  # Pallas kernels run per run of the program (loop bodies x trip counts)

    def by_kind(self) -> dict[str, dict[str, float]]:
        """Per kind: count and bytes per run, and the share of each inside loops."""
        table: dict[str, dict[str, float]] = {}
        for c in self.collectives:
            row = table.setdefault(c.kind, {"count": 0, "bytes": 0.0, "loop_count": 0, "loop_bytes": 0.0})
            row["count"] += c.executions
            row["bytes"] += c.bytes * c.executions
            if c.in_loop:
                row["loop_count"] += c.executions
                row["loop_bytes"] += c.bytes * c.executions
        return table

    def largest(self, *, in_loop: bool | None = None) -> float:
        """The largest single collective's bytes (inside loops only, outside only, or anywhere)."""
        sizes = [c.bytes for c in self.collectives if in_loop is None or c.in_loop == in_loop]
        return max(sizes, default=0.0)


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    opcode: str
    shapes: tuple[tuple[str, str], ...]  # the result's arrays, (dtype, dims)
    spaces: tuple[int, ...]  # each array's memory space (0: HBM)
    operands: tuple[str, ...]  # operand names
    line: str  # kept only where attributes matter (loops, calls, matmuls, collectives); else ""
    root: bool = False  # the computation's ROOT (a loop body's next carry)


_KEEP_LINE = (
    "while",
    "dot",
    "convolution",
    "fusion",
    "call",
    "conditional",
    "compare",
    "constant",
    "custom-call",
    "reduce",
    "map",
    "sort",
    "scatter",
    "select-and-scatter",
    "reduce-window",
    "all-reduce",
    "parameter",  # its number: which operand of a fusion it is
    "get-tuple-element",  # its index: which element of a loop's carry a condition reads
)


def _parse(text: str) -> tuple[dict[str, list[_Instruction]], str | None]:
    """Computations -> their instructions. Linear in the text: an HLO module of a 7B step is ~100 MB."""
    computations: dict[str, list[_Instruction]] = collections.defaultdict(list)
    entry = current = None
    for line in text.splitlines():
        if line and not line[0].isspace():  # computation headers start in column 0, instructions are indented
            header = _COMPUTATION.match(line)
            if header:
                current = header.group(2)
                entry = current if header.group(1) else entry
            continue
        instruction = _INSTRUCTION.match(line) if current is not None else None
        if not instruction:
            continue
        rest = " " + instruction.group(2)
        opcode = _OPCODE.search(rest)
        if not opcode:
            continue
        kind = opcode.group(1)
        arguments_end = rest.find(")", opcode.end())
        operands = tuple(re.findall(r"%([\w.\-]+)", rest[opcode.end() : arguments_end if arguments_end >= 0 else None]))
        base = kind[: -len("-start")] if kind.endswith("-start") else kind
        keep = kind in _KEEP_LINE or base in COLLECTIVES or "calls=" in rest or "to_apply=" in rest
        arrays = _ARRAY.findall(rest[: opcode.start()])
        computations[current].append(
            _Instruction(
                instruction.group(1),
                kind,
                tuple((dtype, dims) for dtype, dims, _ in arrays),
                tuple(int(space.group(1)) if (space := _MEMORY_SPACE.search(layout)) else 0 for *_, layout in arrays),
                operands,
                line if keep else "",
                line.lstrip().startswith("ROOT "),
            )
        )
    return computations, entry


def _trip_count(
    condition: list[_Instruction], body: list[_Instruction], caller: dict[str, _Instruction], loop: _Instruction
) -> int | None:
    """The trip count of a `while` whose condition is `counter < limit` (a scan, a `fori_loop`, a windowed
    matmul); None for any other condition (the decode loop also stops when every row has emitted EOS).

    The counter starts at the constant the loop's initial carry holds and grows by the constant the body adds:
    XLA's bidirectional windowed matmuls step theirs by 2 (over 16 chips: 8 as the limit, 4 trips). Where the
    carry or the body does not show those constants, the counter is taken to start at 0 and step by 1. `caller`:
    the calling computation's instructions by name.
    """
    compares = [i for i in condition if i.opcode == "compare"]
    logic = [i for i in condition if i.opcode in ("and", "or", "not", "reduce", "all-reduce")]
    # s32 for scans and fori_loops, u32 for the windowed (collective) matmuls XLA makes of FSDP dots.
    constants = [i for i in condition if i.opcode == "constant" and i.shapes in ((("s32", ""),), (("u32", ""),))]
    if len(compares) != 1 or logic or len(constants) != 1 or "direction=LT" not in compares[0].line:
        return None
    limit = _constant(constants[0])
    if limit is None:
        return None
    start, step = 0, 1
    reads = [i for i in condition if i.opcode == "get-tuple-element" and i.name in compares[0].operands]
    index = re.search(r"\bindex=(\d+)", reads[0].line) if len(reads) == 1 else None
    if index is not None:
        element = int(index.group(1))
        start = _carried_constant(caller, loop.operands[:1], element, default=start)
        step = _step(body, element, default=step)
    return max(0, -(-(limit - start) // step)) if step > 0 else None


def _constant(instruction: _Instruction | None) -> int | None:
    value = re.search(r"constant\((-?\d+)\)", instruction.line) if instruction is not None else None
    return int(value.group(1)) if value else None


def _carried_constant(named: dict[str, _Instruction], init: tuple[str, ...], element: int, *, default: int) -> int:
    """The constant a loop's initial carry (`init`, a tuple among the caller's instructions `named`) holds at
    `element`, through copies."""
    carry = named.get(init[0]) if init else None
    if carry is None or carry.opcode != "tuple" or element >= len(carry.operands):
        return default
    value = named.get(carry.operands[element])
    while value is not None and value.opcode in ("copy", "bitcast") and value.operands:
        value = named.get(value.operands[0])
    found = _constant(value) if value is not None and value.opcode == "constant" else None
    return default if found is None else found


def _step(body: list[_Instruction], element: int, *, default: int) -> int:
    """What a loop body adds to its carry's `element` each iteration: `add(get-tuple-element, constant)`."""
    named = {i.name: i for i in body}
    roots = [i for i in body if i.root]
    if len(roots) != 1 or roots[0].opcode != "tuple" or element >= len(roots[0].operands):
        return default
    update = named.get(roots[0].operands[element])
    if update is None or update.opcode != "add":
        return default
    parts = [named.get(operand) for operand in update.operands]
    counters = [p for p in parts if p is not None and p.opcode == "get-tuple-element"]
    steps = [_constant(p) for p in parts if p is not None and p.opcode == "constant"]
    if len(counters) != 1 or len(steps) != 1 or steps[0] is None:
        return default
    own = re.search(r"\bindex=(\d+)", counters[0].line)
    return steps[0] if own is not None and int(own.group(1)) == element else default


def _dims(shapes: tuple[tuple[str, str], ...]) -> list[list[int]]:
    return [[int(d) for d in dims.split(",") if d] for _, dims in shapes]


def _matmul_flops(instruction: _Instruction, shapes: dict[str, tuple[tuple[str, str], ...]]) -> float:
    result = _dims(instruction.shapes)
    operands = [_dims(shapes.get(name, ())) for name in instruction.operands[:2]]
    if not result or len(operands) < 2 or not operands[0] or not operands[1]:
        return 0.0
    result, lhs, rhs = result[0], operands[0][0], operands[1][0]
    if instruction.opcode == "dot":
        match = _CONTRACTING.search(instruction.line)
        contracting = [int(i) for i in match.group(1).split(",") if i] if match else []
        return 2.0 * math.prod(result) * math.prod(lhs[i] for i in contracting)
    labels = _DIM_LABELS.search(instruction.line)
    if not labels or len(labels.group(2)) != len(rhs) or "i" not in labels.group(2):
        return 0.0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    if len(lhs_labels) != len(lhs) or len(out_labels) != len(result):
        return 0.0
    # TPU HLO writes batched matmuls as convolutions whose batch dimensions are spatial: a window of 1, or
    # a window as wide as the dimension over an input dilated by the same factor and padded, so that each
    # output position meets one real input element and the rest of its window falls on holes and padding.
    # An output element costs (input features of the kernel) MACs per real tap, not per window element.
    spatial = sorted(int(label) for label in lhs_labels if label.isdigit())
    window = _window(instruction.line, len(spatial))
    macs = math.prod(size for size, label in zip(result, out_labels) if not label.isdigit())
    macs *= rhs[rhs_labels.index("i")]
    for dim in spatial:
        size, stride, (pad_low, _), lhs_dilate, rhs_dilate = (attribute[dim] for attribute in window)
        macs *= _real_taps(
            lhs[lhs_labels.index(str(dim))],
            result[out_labels.index(str(dim))],
            size,
            stride,
            pad_low,
            lhs_dilate,
            rhs_dilate,
        )
    return 2.0 * macs


def _window(line: str, rank: int) -> tuple[list, list, list, list, list]:
    """A convolution's window per spatial dimension: sizes, strides, (low, high) padding, input and
    kernel dilations (HLO leaves out the attributes that are all 1 or 0)."""
    match = re.search(r"window=\{([^}]*)\}", line)
    fields = dict(re.findall(r"(\w+)=([\w\-]+)", match.group(1))) if match else {}

    def numbers(name: str, default: int) -> list[int]:
        return [int(v) for v in fields[name].split("x")] if name in fields else [default] * rank

    padding = (
        [tuple(int(v) for v in pair.split("_")) for pair in fields["pad"].split("x")]
        if "pad" in fields
        else [(0, 0)] * rank
    )
    return numbers("size", 1), numbers("stride", 1), padding, numbers("lhs_dilate", 1), numbers("rhs_dilate", 1)


def _real_taps(
    size: int, outputs: int, window: int, stride: int, pad_low: int, lhs_dilate: int, rhs_dilate: int
) -> int:
    """Window positions, summed over the outputs of one spatial dimension, that land on a real input
    element (not on padding or on a hole of the input's dilation)."""
    extent = (size - 1) * lhs_dilate
    taps = 0
    for output in range(outputs):
        for k in range(window):
            x = output * stride + k * rhs_dilate - pad_low
            taps += 0 <= x <= extent and x % lhs_dilate == 0
    return taps


def summarize(text: str) -> HloSummary:
    """Collectives and matmul FLOPs of an HLO module's text (`compiled.as_text()`)."""
    computations, entry = _parse(text)
    shapes = {i.name: i.shapes for instructions in computations.values() for i in instructions}
    calls: dict[str, list[tuple[str, int, bool]]] = collections.defaultdict(list)  # caller -> [(callee, times, loop)]
    loops: list[tuple[str, int | None]] = []
    for name, instructions in computations.items():
        named = None  # this computation's instructions by name, made for its first loop
        for i in instructions:
            callees = _CALLEE.findall(i.line)
            for group in _CALLEE_LIST.findall(i.line):
                callees += [callee.strip().lstrip("%") for callee in group.split(",") if callee.strip()]
            if i.opcode == "while":
                body = re.search(r"\bbody=%?([\w.\-]+)", i.line)
                condition = re.search(r"\bcondition=%?([\w.\-]+)", i.line)
                trip = _TRIP.search(i.line)
                named = named if named is not None else {j.name: j for j in instructions}
                count = (
                    int(trip.group(1))
                    if trip
                    else (
                        _trip_count(
                            computations.get(condition.group(1), []),
                            computations.get(body.group(1), []) if body else [],
                            named,
                            i,
                        )
                        if condition
                        else None
                    )
                )
                if body:
                    loops.append((body.group(1), count))
                calls[name] += [(callee, count or 1, True) for callee in callees]
            else:
                calls[name] += [(callee, 1, False) for callee in callees]

    executions: dict[str, int] = collections.defaultdict(int)  # per run of the program
    counted: dict[str, int] = collections.defaultdict(int)  # as XLA's cost analysis counts: each loop body once
    in_loop: dict[str, bool] = {}

    def visit(name: str, times: int, once: int, looped: bool, depth: int = 0) -> None:
        if depth > 64:
            return
        executions[name] += times
        counted[name] += once
        in_loop[name] = in_loop.get(name, False) or looped
        for callee, factor, is_loop in calls.get(name, ()):
            visit(callee, times * factor, once * (1 if is_loop else factor), looped or is_loop, depth + 1)

    if entry is not None:
        visit(entry, 1, 1, False)
    collectives: list[Collective] = []
    unpriced = pallas = 0
    for name, instructions in computations.items():
        times = executions.get(name, 0)
        for i in instructions if times else ():
            if i.opcode == "custom-call":
                target = _TARGET.search(i.line)
                unpriced += counted.get(name, 0) * (target is not None and target.group(1) in UNPRICED_CUSTOM_CALLS)
                pallas += times * (target is not None and target.group(1) == PALLAS_CUSTOM_CALL)
            kind = i.opcode[: -len("-start")] if i.opcode.endswith("-start") else i.opcode
            if kind in COLLECTIVES:
                operands = [shape_bytes(*array) for operand in i.operands for array in shapes.get(operand, ())]
                # A combined collective (a tuple) moves each of its buffers: operands reduced or exchanged whole,
                # results gathered whole.
                if kind in _SUMMED_OPERANDS:
                    size = sum(operands)
                elif i.opcode == "all-gather":
                    size = sum(shape_bytes(*array) for array in i.shapes)
                else:  # a start's result also holds its operands (and a permute's, context words): the largest
                    size = max([shape_bytes(*array) for array in i.shapes] + operands, default=0.0)
                collectives.append(Collective(kind, size, times, in_loop.get(name, False)))

    # Every computation's own matmuls (fusions are computations of their own) times the executions XLA's count
    # leaves out: a loop body runs its trip count times per run of its caller, nested loops multiplying, where XLA
    # counts each body once. The loss's vocabulary chunks, attention's query blocks, the windowed matmuls XLA makes
    # of a matmul and its reduce-scatter (inside the chunks), gradient accumulation: all alike.
    uncounted = 0.0
    for name, times in executions.items():
        extra = times - counted.get(name, 0)
        if extra > 0:
            uncounted += extra * sum(
                _matmul_flops(i, shapes) for i in computations.get(name, ()) if i.opcode in ("dot", "convolution")
            )
    instructions = {i.name: i for body in computations.values() for i in body}
    hbm = {body: _hbm_bytes(body, computations, instructions) for body, _ in loops}
    return HloSummary(
        collectives=collectives,
        uncounted_loop_flops=uncounted,
        loops=loops,
        loop_hbm_bytes=hbm,
        unpriced_custom_calls=unpriced,
        pallas_kernel_calls=pallas,
    )


# Collectives whose operands are all moved in full: a combined (tuple) one moves their sum.
_SUMMED_OPERANDS = ("all-reduce", "reduce-scatter", "all-to-all")
_NO_TRAFFIC = ("parameter", "get-tuple-element", "tuple", "constant", "bitcast", "opt-barrier", "after-all", "iota")
_READS_PART = ("dynamic-slice", "gather", "slice")  # read what they take of their first operand


def _in_hbm(instruction: _Instruction | None) -> float:
    if instruction is None:
        return 0.0
    return sum(shape_bytes(*shape) for shape, space in zip(instruction.shapes, instruction.spaces) if space == 0)


def _hbm_bytes(
    name: str, computations: dict[str, list[_Instruction]], instructions: dict[str, _Instruction], depth: int = 0
) -> float:
    """HBM bytes read and written by one execution of computation `name` (see the module docstring).

    Top-level instructions count their operands and results that live in HBM; a fusion's operand counts
    only what the fused computation takes of it when it is only sliced, gathered or updated in place
    there, and a fused in-place update writes only its update. Async pairs count once (at the start);
    nested loops count their body times their trip count (once when unknown); a conditional its
    largest branch.
    """
    if depth > 16:
        return 0.0
    total = 0.0
    for i in computations.get(name, ()):
        if i.opcode in _NO_TRAFFIC or i.opcode.endswith("-done"):
            continue
        operands = [instructions.get(operand) for operand in i.operands]
        callees = _CALLEE.findall(i.line)
        if i.opcode == "while":
            body = re.search(r"\bbody=%?([\w.\-]+)", i.line)
            trip = _TRIP.search(i.line)
            if body:
                total += (int(trip.group(1)) if trip else 1) * _hbm_bytes(
                    body.group(1), computations, instructions, depth + 1
                )
        elif i.opcode == "call" and callees:
            total += _hbm_bytes(callees[0], computations, instructions, depth + 1)
        elif i.opcode == "conditional":
            branches = [b.strip().lstrip("%") for group in _CALLEE_LIST.findall(i.line) for b in group.split(",")]
            total += max((_hbm_bytes(b, computations, instructions, depth + 1) for b in branches if b), default=0.0)
        elif i.opcode == "dynamic-update-slice":
            total += 2 * _in_hbm(operands[1] if len(operands) > 1 else None)  # the window: read and written
        elif i.opcode in _READS_PART:
            total += 2 * _in_hbm(i) + sum(_in_hbm(index) for index in operands[1:])
        elif i.opcode == "fusion" and callees:
            total += _fusion_hbm_bytes(i, operands, computations.get(callees[0], []))
        elif i.opcode == "slice-start":
            # An asynchronous slice (into on-chip memory, usually): it reads its window of the operand.
            *_, (window, space), _ = zip(i.shapes, i.spaces)
            read = shape_bytes(*window) if operands and operands[0] is not None and _in_hbm(operands[0]) else 0.0
            total += read + (shape_bytes(*window) if space == 0 else 0.0)
        elif i.opcode.endswith("-start"):
            # The result tuple repeats the operands (aliases) beside the destination: count the
            # operands once and what is new once.
            results = list(zip(i.shapes, i.spaces))
            for operand in operands:
                for alias in zip(operand.shapes, operand.spaces) if operand is not None else ():
                    if alias in results:
                        results.remove(alias)
            total += sum(_in_hbm(operand) for operand in operands)
            total += sum(shape_bytes(*shape) for shape, space in results if space == 0)
        else:
            total += sum(_in_hbm(operand) for operand in operands) + _in_hbm(i)
    return total


def _fusion_hbm_bytes(fusion: _Instruction, operands: list, fused: list[_Instruction]) -> float:
    parameters: dict[int, _Instruction] = {}
    users: dict[str, list[_Instruction]] = collections.defaultdict(list)
    for i in fused:
        if i.opcode == "parameter":
            number = re.search(r"parameter\((\d+)\)", i.line) if i.line else None
            parameters[int(number.group(1)) if number else len(parameters)] = i
        for operand in i.operands:
            users[operand].append(i)
    by_name = {i.name: i for i in fused}
    total = 0.0
    for index, operand in enumerate(operands):
        if operand is None or not _in_hbm(operand):
            continue
        parameter = parameters.get(index)
        uses = users.get(parameter.name, []) if parameter is not None else []
        if uses and all(u.opcode in _READS_PART and u.operands[0] == parameter.name for u in uses):
            total += sum(shape_bytes(*u.shapes[0]) for u in uses if u.shapes)
        elif uses and all(u.opcode == "dynamic-update-slice" and u.operands[0] == parameter.name for u in uses):
            continue  # updated in place: the written window is counted with the result
        else:
            total += _in_hbm(operand)
    root = fused[-1] if fused else None
    outputs = [by_name.get(o) for o in root.operands] if root is not None and root.opcode == "tuple" else [root]
    for output, shape, space in zip(outputs, fusion.shapes, fusion.spaces):
        if space != 0:
            continue
        if output is not None and output.opcode == "dynamic-update-slice" and len(output.operands) > 1:
            update = by_name.get(output.operands[1])
            total += 2 * shape_bytes(*update.shapes[0]) if update is not None and update.shapes else shape_bytes(*shape)
        else:
            total += shape_bytes(*shape)
    return total
