"""How instant the CLI feels: `qlora --help` against importing the ML stack, in one run.

python -m benchmarks.bench_startup [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "qlora --help": [sys.executable, "-m", "qlora_cli", "--help"],
    "qlora validate recipes/mistral7b-alpaca.yaml": [
        sys.executable,
        "-m",
        "qlora_cli",
        "validate",
        "recipes/mistral7b-alpaca.yaml",
    ],
    "import torch, transformers, peft, trl": [sys.executable, "-c", "import torch, transformers, peft, trl"],
}


def median_seconds(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    results = {name: median_seconds(command, args.runs) for name, command in COMMANDS.items()}
    stack = results["import torch, transformers, peft, trl"]
    print(f"{'command':<48} {'median s':>9} {'share of stack import':>22}")
    for name, seconds in results.items():
        print(f"{name:<48} {seconds:>9.3f} {100 * seconds / stack:>21.1f}%")


if __name__ == "__main__":
    main()
