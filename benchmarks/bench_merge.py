"""Benchmark: peak memory of `qlora merge` (shard by shard) against peft's merge_and_unload.

    python -m benchmarks.bench_merge [--layers 24 --hidden 1536 ...] [--json out.json]
    python -m benchmarks.bench_merge --small     # seconds-long smoke run

Builds a random Mistral-shaped base (saved as bf16 shards) and a random, non-zero LoRA adapter in
the format `qlora train` writes, then runs each merge in a fresh Python process, so that each peak
RSS is its own, and prints a table. The builders (qlora_cli.testing) are also the test suite's fixtures,
so the format benchmarked is the format tested.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from qlora_cli.testing import build_adapter, build_base, run_in_fresh_process

METHODS = ("streaming", "merge_and_unload")


def measure(method: str, base_dir: Path, adapter_dir: Path, out_dir: Path) -> dict:
    """Run in a fresh process: import what the method needs, then merge; report RSS and time."""
    import bitsandbytes  # noqa: F401  (both methods load it: peft imports it when installed)
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_cli import merge

    imports_rss = proc_status_mib("VmRSS")
    started = time.monotonic()
    if method == "streaming":
        merge.run(str(adapter_dir), out_dir, verify=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
        model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        model.save_pretrained(out_dir)
    return {
        "method": method,
        "peak_rss_mib": round(proc_status_mib("VmHWM"), 1),
        "imports_rss_mib": round(imports_rss, 1),
        "seconds": round(time.monotonic() - started, 1),
    }


def proc_status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries the parent's peak into
    a child across fork and exec, so a child of the process that built the model would report its size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024  # the kernel reports KiB
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark reads Linux's per-process memory counters)")


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_merge", description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--intermediate", type=int, default=5376)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--small", action="store_true", help="a tiny model: a smoke run of a few seconds per method")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--measure", nargs=5, metavar=("METHOD", "BASE", "ADAPTER", "OUT", "RESULT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)

    if args.measure:
        method, base_dir, adapter_dir, out_dir, result = args.measure
        Path(result).write_text(json.dumps(measure(method, Path(base_dir), Path(adapter_dir), Path(out_dir))))
        return
    if args.small:
        args.layers, args.hidden, args.intermediate, args.vocab, args.heads, args.kv_heads, args.shards, args.r = (
            2,
            64,
            128,
            128,
            4,
            2,
            4,
            4,
        )

    with tempfile.TemporaryDirectory(prefix="qlora-bench-merge-") as scratch:
        scratch = Path(scratch)
        base_dir, adapter_dir = scratch / "base", scratch / "adapter"
        model = build_base(
            base_dir,
            layers=args.layers,
            hidden=args.hidden,
            intermediate=args.intermediate,
            vocab=args.vocab,
            heads=args.heads,
            kv_heads=args.kv_heads,
            shards=args.shards,
        )
        build_adapter(model, base_dir, adapter_dir, r=args.r)
        del model
        rows = [
            run_in_fresh_process(
                "benchmarks.bench_merge", "--measure", method, str(base_dir), str(adapter_dir), str(scratch / method)
            )
            for method in METHODS
        ]
        model_mib, shard_count = folder_mib(base_dir), len(list(base_dir.glob("*.safetensors")))

    reference = rows[-1]["peak_rss_mib"]
    for row in rows:
        row["ratio"] = round(row["peak_rss_mib"] / reference, 3)
    table = Table(title=f"merge peak memory: {model_mib:.0f} MiB bf16 model in {shard_count} shards, LoRA r={args.r}")
    for column in ("method", "peak RSS MiB", "RSS after imports MiB", "seconds", "ratio"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        table.add_row(
            row["method"],
            f"{row['peak_rss_mib']:.0f}",
            f"{row['imports_rss_mib']:.0f}",
            f"{row['seconds']:.1f}",
            f"{row['ratio']:.2f}",
        )
    Console().print(table)
    if args.json:
        args.json.write_text(
            json.dumps({"model_mib": round(model_mib, 1), "shards": shard_count, "r": args.r, "rows": rows}, indent=2)
            + "\n"
        )


if __name__ == "__main__":
    main()
