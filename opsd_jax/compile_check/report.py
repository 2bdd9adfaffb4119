"""The compile-check's table and JSON: one row per program, per chip."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

from opsd_jax.compile_check.programs import ProgramReport
from opsd_jax.sharding.topology import Chip

GB = 1e9


def verdicts(reports: Sequence[ProgramReport], min_spare: float) -> list[str]:
    """One line per program that failed: did not compile, or left less than `min_spare` of HBM."""
    problems = []
    for report in reports:
        if not report.compiled:
            problems.append(f"{report.name}: does not compile: {report.error}")
        elif report.spare < min_spare:
            problems.append(
                f"{report.name}: does not fit: peak {report.peak / GB:.2f} GB of {report.hbm_bytes / GB:.2f} GB HBM per "
                f"chip leaves {100 * report.spare:.1f}% (need >= {100 * min_spare:.0f}%)"
            )
    return problems


def _collectives(report: ProgramReport) -> str:
    parts = []
    for kind, row in sorted(report.collectives.items()):
        loop = f", {int(row['loop_count'])} in loops" if row["loop_count"] else ""
        parts.append(f"{kind} {int(row['count'])} x / {row['bytes'] / GB:.2f} GB{loop}")
    return "; ".join(parts) or "none"


def table(reports: Sequence[ProgramReport], chip: Chip, header: str) -> str:
    """A plain-text table (per chip; GB = 1e9 bytes)."""
    lines = [
        header,
        f"chip {chip.generation}: {chip.hbm_bytes / GB:.2f} GB HBM, {chip.bf16_flops / 1e12:.0f} TFLOP/s bf16, "
        f"{chip.hbm_bandwidth / 1e9:.0f} GB/s",
        "",
    ]
    columns = (
        f"{'program':<18} {'args':>7} {'temp':>7} {'out':>6} {'resid':>6} {'peak':>7} {'spare':>6} "
        f"{'TFLOP':>8} {'cost model':>11} {'compute':>9} {'ratio':>6}"
    )
    lines += [columns, "-" * len(columns)]
    for r in reports:
        if not r.compiled:
            lines.append(f"{r.name:<18} did not compile: {r.error}")
            continue
        m = r.memory
        cost = f"{r.cost_model_seconds:.3f} s" if r.cost_model_seconds else "n/a"
        ratio = (
            f"{r.cost_model_seconds / r.compute_seconds:.2f}x" if r.cost_model_seconds and r.compute_seconds else "-"
        )
        lines.append(
            f"{r.name:<18} {m['arguments'] / GB:7.2f} {m['temporaries'] / GB:7.2f} {(m['outputs'] - m['aliased']) / GB:6.2f} "
            f"{m['resident'] / GB:6.2f} {r.peak / GB:7.2f} {100 * r.spare:5.1f}% {r.flops / 1e12:8.2f} {cost:>11} "
            f"{r.compute_seconds:8.3f}s {ratio:>6}"
        )
    for r in reports:
        if r.compiled and (r.unpriced_custom_calls or r.pallas_kernel_calls):
            lines.append(
                f"  {r.name}: cost model without {r.unpriced_custom_calls} custom calls it does not price (-1 s each, "
                f"added back); {r.pallas_kernel_calls} Pallas kernel runs, priced at about nothing and their FLOPs "
                "in neither count"
            )
    lines.append("")
    lines.append(
        "collectives per run (count / bytes: each one's largest buffer, every buffer of a combined one; loop bodies x trip counts):"
    )
    for r in reports:
        if r.compiled:
            lines.append(f"  {r.name:<18} {_collectives(r)}")
    decodes = [r for r in reports if r.per_token]
    if decodes:
        lines.append("")
        lines.append("decode, per generated token (one loop iteration):")
        for r in decodes:
            t = r.per_token
            lines.append(
                f"  {r.name:<18} HBM traffic {t['hbm_bytes'] / GB:.2f} GB -> {1e3 * t['seconds_at_hbm_bandwidth']:.2f} ms at "
                f"HBM bandwidth; floor {1e3 * t['floor_seconds']:.2f} ms (its arguments once: weights it uses, KV cache, "
                f"state: {t['floor_bytes'] / GB:.2f} GB): {t['ratio_to_floor']:.2f}x (XLA's bytes accessed, on-chip memory "
                f"included: {t['xla_ratio_to_floor']:.2f}x); collectives {int(t['collective_count'])} "
                f"moving {t['collective_bytes'] / GB:.3f} GB, largest {t['largest_collective'] / 1e6:.2f} MB"
            )
    return "\n".join(lines)


def to_json(reports: Sequence[ProgramReport], chip: Chip, **context: Any) -> str:
    return json.dumps(
        {
            **context,
            "chip": dataclasses.asdict(chip),
            "programs": [{**dataclasses.asdict(r), "peak": r.peak, "spare": r.spare} for r in reports],
        },
        indent=2,
    )
