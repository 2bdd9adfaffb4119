"""Decode throughput of the jitted sampler against transformers `generate`, same weights, same prompts.

For each config (tiny, small) and batch size (1, 8): greedy decoding of `--new-tokens` tokens after a
`--prompt-len`-token prompt, no early stop. Prefill is measured apart as the time of a 1-token
generation; decode time is `T(new tokens) - T(1 token)` for both implementations, so decode throughput
is `batch * (new_tokens - 1) / decode_time`. Medians over `--repeats` runs after a warm-up (which
also absorbs JAX's compilation). Both run on this machine's CPU in the same process.

    python -m benchmarks.decode            # full table, writes benchmarks/results/decode.json
    python -m benchmarks.decode --quick    # tiny sizes (the smoke test)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import force_host_devices, format_table, median_seconds, write_results

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=256,
        mrope_section=(2, 3, 3),
    ),
    "small": dict(
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        num_kv_heads=2,
        intermediate_size=1408,
        vocab_size=32768,
        mrope_section=(8, 12, 12),
    ),
}


def measure(name: str, batch: int, prompt_len: int, new_tokens: int, repeats: int, workdir: Path) -> dict[str, Any]:
    import jax
    import numpy as np
    import torch

    from opsd_jax.models.qwen2_5_omni import from_pretrained
    from opsd_jax.sampling import generate
    from opsd_jax.testing.reference import build_reference_thinker, save_reference_thinker, tiny_thinker_config_dict

    reference = build_reference_thinker(tiny_thinker_config_dict(**CONFIGS[name]))
    model = from_pretrained(save_reference_thinker(reference, workdir / f"{name}_{batch}"))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 200, (batch, prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    torch_ids, torch_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
    no_eos = -1  # never emitted: every row decodes the full length

    def ours(tokens: int):
        return lambda: jax.block_until_ready(
            generate(
                model,
                {"input_ids": ids, "attention_mask": mask},
                max_new_tokens=tokens,
                temperature=0,
                eos_token_id=no_eos,
                pad_token_id=0,
            ).tokens
        )

    def theirs(tokens: int):
        def run():
            with torch.no_grad():
                return reference.generate(
                    input_ids=torch_ids,
                    attention_mask=torch_mask,
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )

        return run

    ours_prefill = median_seconds(ours(1), repeats=repeats)
    ours_total = median_seconds(ours(new_tokens), repeats=repeats)
    ref_prefill = median_seconds(theirs(1), repeats=repeats)
    ref_total = median_seconds(theirs(new_tokens), repeats=repeats)
    decoded = batch * (new_tokens - 1)
    ours_rate = decoded / max(ours_total - ours_prefill, 1e-9)
    ref_rate = decoded / max(ref_total - ref_prefill, 1e-9)
    return {
        "config": name,
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "jax_prefill_s": ours_prefill,
        "torch_prefill_s": ref_prefill,
        "jax_decode_tok_s": ours_rate,
        "torch_decode_tok_s": ref_rate,
        "speedup": ours_rate / ref_rate,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="tiny,small", help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per cell (the median is reported)")
    parser.add_argument("--quick", action="store_true", help="tiny config, batch 1, few tokens (smoke test)")
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/decode.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.batches, args.new_tokens, args.prompt_len, args.repeats = "tiny", "1", 4, 8, 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            for batch in (int(b) for b in args.batches.split(",")):
                rows.append(measure(name, batch, args.prompt_len, args.new_tokens, args.repeats, Path(tmp)))
                print(f"  measured {name} batch {batch}: {rows[-1]['speedup']:.2f}x", flush=True)
    headers = [
        "config",
        "batch",
        "prefill JAX (s)",
        "prefill torch (s)",
        "decode JAX (tok/s)",
        "decode torch (tok/s)",
        "JAX / torch",
    ]
    table = format_table(
        headers,
        [
            (
                r["config"],
                r["batch"],
                r["jax_prefill_s"],
                r["torch_prefill_s"],
                r["jax_decode_tok_s"],
                r["torch_decode_tok_s"],
                f"{r['speedup']:.2f}x",
            )
            for r in rows
        ],
    )
    print(table)
    path = write_results("decode", {"settings": vars(args), "rows": rows, "table": table}, args.out)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    force_host_devices(1)  # before JAX starts; in-process callers (the tests) keep their devices
    main()
