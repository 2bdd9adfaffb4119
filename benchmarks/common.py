"""What every benchmark script shares: timing, the machine's description, the table and the JSON file."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


def with_host_device_count(xla_flags: str, count: int) -> str:
    """`xla_flags` with its forced CPU device count (if any) replaced by `count`, other flags kept."""
    flags = [f for f in xla_flags.split() if "xla_force_host_platform_device_count" not in f]
    return " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])


def force_host_devices(count: int = 8) -> None:
    """`count` forced CPU devices for this process, replacing any count inherited in XLA_FLAGS (the Makefile
    exports 8). Takes effect only before JAX initialises its backends: call it from a script's entry point."""
    os.environ["XLA_FLAGS"] = with_host_device_count(os.environ.get("XLA_FLAGS", ""), count)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def median_seconds(run: Callable[[], Any], *, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `run()` over `repeats` calls after `warmup` untimed ones.

    `run` must block until its work is done (call `jax.block_until_ready` on JAX results).
    """
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    import jax

    return {
        "date": datetime.date.today().isoformat(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": jax.device_count(),
    }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (it reads well in a terminal and pastes into the README)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Writes `payload` plus the machine description as JSON (default `benchmarks/results/NAME.json`)."""
    out = out or RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": name, "machine": machine(), **payload}, indent=2, default=str) + "\n")
    return out
