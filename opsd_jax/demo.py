"""`make demo`: the most complete path the project runs end to end on the CPU today.

1. Build a tiny random Qwen2.5-Omni thinker with transformers (the PyTorch reference) and save it as a
   Hugging Face checkpoint directory.
2. Load it into the Flax port through `from_pretrained`, the path real checkpoints take.
3. Run the forward on one device and sharded on the device mesh of `configs/demo_tiny.yaml`.
4. Print the parity figures against the reference.

Needs the `test` extra (PyTorch builds the reference); the package itself never imports PyTorch.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from opsd_jax.config import load_config  # noqa: E402
from opsd_jax.models.qwen2_5_omni import from_pretrained  # noqa: E402
from opsd_jax.sharding import make_mesh, shard_batch  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo_tiny.yaml"


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def run(config_path: Path, overrides: list[str], workdir: Path) -> dict[str, float]:
    import torch

    from opsd_jax.testing.reference import build_reference_thinker, save_reference_thinker, tiny_thinker_config_dict

    config = load_config(config_path, overrides)
    jax.config.update("jax_platforms", "cpu")
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; mesh {config.mesh}")

    start = time.perf_counter()
    reference = build_reference_thinker(tiny_thinker_config_dict(), seed=config.train.seed)
    checkpoint = save_reference_thinker(reference, workdir / "tiny_thinker")
    print(f"[1/4] built and saved a tiny random thinker ({sum(p.numel() for p in reference.parameters()):,} params) "
          f"in {time.perf_counter() - start:.1f}s -> {checkpoint}")

    rng = np.random.default_rng(config.train.seed)
    ids = rng.integers(0, 200, (config.train.batch_size, 24)).astype(np.int32)
    mask = np.ones_like(ids)
    for row in range(1, len(ids), 2):  # every other row left-padded, as batches of prompts are
        mask[row, : 3 + row % 5] = 0
    ids = np.where(mask == 1, ids, 0)
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()

    start = time.perf_counter()
    model = from_pretrained(checkpoint)
    single = np.asarray(jax.jit(lambda i, m: model(i, attention_mask=m))(jnp.asarray(ids), jnp.asarray(mask)))
    print(f"[2/4] loaded into Flax and ran the forward on one device in {time.perf_counter() - start:.1f}s")

    start = time.perf_counter()
    mesh = make_mesh(config.mesh)
    sharded_model = from_pretrained(checkpoint, mesh=mesh)
    batch = shard_batch({"ids": jnp.asarray(ids), "mask": jnp.asarray(mask)}, mesh)
    sharded = np.asarray(jax.jit(lambda i, m: sharded_model(i, attention_mask=m))(batch["ids"], batch["mask"]))
    print(f"[3/4] sharded forward on mesh {dict(mesh.shape)} in {time.perf_counter() - start:.1f}s")

    real = mask.astype(bool)
    figures = {
        "max |logits - reference| (1 device)": float(np.abs(single - expected)[real].max()),
        "max |logits - reference| (mesh)": float(np.abs(sharded - expected)[real].max()),
        "max |mesh - 1 device|": float(np.abs(sharded - single)[real].max()),
        "greedy next-token agreement": float((sharded.argmax(-1) == expected.argmax(-1))[real].mean()),
    }
    print("[4/4] parity with transformers (float32, real tokens of a left-padded batch):")
    print(_table([(name, f"{value:.3g}") for name, value in figures.items()]))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG, help="run config (default: configs/demo_tiny.yaml)")
    parser.add_argument("--workdir", type=Path, help="where the tiny checkpoint is written (default: a temp dir)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. mesh.tensor=1")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        figures = run(args.config, args.overrides, args.workdir or Path(tmp))
    ok = figures["max |logits - reference| (mesh)"] <= 1e-4
    print("parity: OK" if ok else "parity: FAILED (tolerance 1e-4)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
