"""What a padding-free packed batch costs the attention path: the mask each kernel is handed, and one forward.

    python -m benchmarks.bench_attention [--rows 8] [--length 2048] [--no-forward] [--json attention.json]

Packed rows carry example boundaries only in position_ids. transformers turns them into a dense
(tokens x tokens) boolean mask for sdpa (the old path) and into a BlockMask for flex attention (what
`attn_implementation: auto` picks for packed training on CUDA). Both masks are built here by
transformers' own `create_causal_mask`, on CPU, exactly as the model's forward builds them, and weighed
by the bytes of every tensor they hold (a BlockMask's mask function keeps the row's sequence ids too).
With the forward, each kernel also runs the shipped tiny base (4-bit NF4) once over the packed row, in a
fresh process: the wall time and the peak RSS above where the call began, for a first call (flex
compiles with inductor, into an empty cache) and a second. Expect minutes on two cores: sdpa attends
across the whole row.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

from qlora_cli.recipe import TINY_BASE
from qlora_cli.testing import run_in_fresh_process

KERNELS = ("sdpa", "flex_attention")


def packed_position_ids(rows: int, length: int, seed: int = 0) -> list[int]:
    """Rows of `length` tokens filled with examples of 32-512 tokens (the last one cut to fit), flattened
    into one padding-free row as TRL's collator does: positions restart at 0 with each example."""
    rng = random.Random(seed)
    positions: list[int] = []
    for _ in range(rows):
        filled = 0
        while filled < length:
            size = min(rng.randint(32, 512), length - filled)
            positions.extend(range(size))
            filled += size
    return positions


def held_tensors(value, seen: set[int] | None = None) -> list:
    """Every tensor a mask holds: itself, or a BlockMask's index tensors and the tensors its mask function closes over."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask

    seen = set() if seen is None else seen
    if id(value) in seen:
        return []
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, BlockMask):
        value = value.as_tuple()
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in held_tensors(item, seen)]
    cells = getattr(value, "__closure__", None) or ()
    return [
        tensor for cell in cells if cell.cell_contents is not None for tensor in held_tensors(cell.cell_contents, seen)
    ]


def nbytes(tensors: list) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def measure_mask(kernel: str, positions: list[int]) -> dict:
    import torch
    from transformers import AutoConfig
    from transformers.masking_utils import create_causal_mask

    config = AutoConfig.from_pretrained(TINY_BASE)
    config._attn_implementation = kernel
    position_ids = torch.tensor([positions])
    embeds = torch.empty(1, len(positions), 1)  # only its shape, dtype and device are read
    started = time.perf_counter()
    mask = create_causal_mask(
        config=config, inputs_embeds=embeds, attention_mask=None, cache=None, position_ids=position_ids
    )
    seconds = time.perf_counter() - started
    tensors = held_tensors(mask)
    return {
        "kernel": kernel,
        "mask_type": type(mask).__name__,
        "mask_shape": list(mask.shape),
        "mask_bytes": nbytes(tensors),
        "largest_tensor": list(max(tensors, key=lambda tensor: tensor.numel()).shape),
        "build_seconds": round(seconds, 3),
    }


class PeakRss:
    """The peak resident memory over a block, sampled from /proc every 2 ms, above where it began. (ru_maxrss
    cannot say this: it is the high-water mark of the whole process, loading included.)"""

    def __enter__(self) -> PeakRss:
        import threading

        self.start = self.peak = self.rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.growth = self.peak - self.start

    def sample(self) -> None:
        while not self.done.wait(0.002):
            self.peak = max(self.peak, self.rss())
        self.peak = max(self.peak, self.rss())

    @staticmethod
    def rss() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_forward(kernel: str, rows: int, length: int) -> dict:
    """Runs in a fresh process: two forwards over the same packed row (the first compiles, for flex)."""
    import torch

    from qlora_cli.model import load_model
    from qlora_cli.recipe import ModelSection

    section = ModelSection(id=str(TINY_BASE), compute_dtype="float32", device="cpu", attn_implementation=kernel)
    model = load_model(section, TINY_BASE, device=torch.device("cpu")).eval()
    positions = torch.tensor([packed_position_ids(rows, length)])
    input_ids = torch.randint(3, model.config.vocab_size, positions.shape, generator=torch.Generator().manual_seed(0))
    timings, growth = [], []
    for _ in range(2):
        started = time.perf_counter()
        with PeakRss() as peak, torch.no_grad():
            model(input_ids=input_ids, position_ids=positions, logits_to_keep=1)
        timings.append(round(time.perf_counter() - started, 2))
        growth.append(peak.growth)
    return {"kernel": kernel, "forward_seconds": timings, "peak_rss_growth_bytes": growth}


def mib(count: int) -> str:
    return f"{count / 2**20:,.2f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_attention", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="packed rows per micro-batch")
    parser.add_argument("--length", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--no-forward", action="store_true", help="weigh the masks only; skip the tiny-model forwards")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(  # the child process
        "--forward-only", nargs=2, metavar=("KERNEL", "RESULT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.forward_only:
        kernel, result = args.forward_only
        Path(result).write_text(json.dumps(measure_forward(kernel, args.rows, args.length)))
        return

    # Empty inductor caches, here and one per child, so that flex's first calls show the compile a new machine pays.
    caches = tempfile.TemporaryDirectory(prefix="bench-attention-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(caches.name, "masks")
    import qlora_cli  # noqa: F401  (thread settings before torch loads)

    positions = packed_position_ids(args.rows, args.length)
    examples = sum(1 for position in positions if position == 0)
    print(f"{args.rows} x {args.length} = {len(positions)} packed tokens, {examples} examples, on CPU\n")
    masks = [measure_mask(kernel, positions) for kernel in KERNELS]
    print(f"{'kernel':<16} {'mask':<10} {'shape':<28} {'bytes held':>14} {'largest tensor':<22} {'built in':>9}")
    for row in masks:
        print(
            f"{row['kernel']:<16} {row['mask_type']:<10} {str(row['mask_shape']):<28} {mib(row['mask_bytes']):>14} "
            f"{str(row['largest_tensor']):<22} {row['build_seconds']:>8.2f}s"
        )
    print(f"\nflex attention holds {masks[0]['mask_bytes'] / masks[1]['mask_bytes']:,.0f}x fewer mask bytes than sdpa")
    results = {"rows": args.rows, "length": args.length, "examples": examples, "masks": masks, "forwards": []}

    if not args.no_forward:
        print("\none forward of the tiny base (4-bit NF4, fp32 compute), fresh process per kernel")
        print(f"{'kernel':<16} {'1st call':>9} {'peak RSS growth':>16} {'2nd call':>9} {'peak RSS growth':>16}")
        for kernel in KERNELS:
            row = run_in_fresh_process(
                "benchmarks.bench_attention",
                "--rows",
                str(args.rows),
                "--length",
                str(args.length),
                "--forward-only",
                kernel,
                environment={"TORCHINDUCTOR_CACHE_DIR": os.path.join(caches.name, kernel)},
            )
            results["forwards"].append(row)
            (first, second), (first_peak, second_peak) = row["forward_seconds"], row["peak_rss_growth_bytes"]
            print(f"{kernel:<16} {first:>8.2f}s {mib(first_peak):>16} {second:>8.2f}s {mib(second_peak):>16}")

    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    caches.cleanup()


if __name__ == "__main__":
    main()
