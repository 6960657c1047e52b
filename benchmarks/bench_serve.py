"""`qlora serve` under load: requests for three adapters from 1, 4 and 16 concurrent clients, served with
mixed-adapter batches and one request at a time (switching adapters), in one run; then a fixed-length load
test that counts failed requests and watches the server's memory.

python -m benchmarks.bench_serve [--adapters-dir adapters] [--requests 32] [--load-seconds 20]

With fewer than three adapters in --adapters-dir, three adapters with random weights are made on the tiny
base (their answers are noise; their cost is an adapter's cost).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_BASE = ROOT / "recipes" / "tiny" / "base"
CLIENTS = (1, 4, 16)
QUESTION = "Repeat the input.\n\nred blue green yellow"


def synthetic_adapter(folder: Path, seed: int, base: Path = TINY_BASE, use_dora: bool = False) -> Path:
    """A LoRA adapter with random (non-zero) B on `base`: each seed answers differently."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=64,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        use_dora=use_dora,
    )
    get_peft_model(model, config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def start_server(home: Path, batching: str, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "qlora_cli", "serve", "--adapters-dir", str(home), "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--batching", batching, "--queue", "256"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in process.stdout:  # the server says when it listens
        if "serving" in line:
            threading.Thread(target=process.stdout.read, daemon=True).start()  # keep its pipe drained
            return process
    raise SystemExit(f"qlora serve did not start ({batching})")


def ask(url: str, model: str, max_tokens: int, key: str | None = None) -> tuple[float, int]:
    """One chat request: (seconds, generated tokens)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(), headers=headers)
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        usage = json.loads(response.read())["usage"]
    return time.perf_counter() - started, usage["completion_tokens"]


def measure(url: str, models: list[str], clients: int, requests: int, max_tokens: int) -> dict:
    """`requests` requests from `clients` threads, the adapters taken in turn."""
    plan = [models[index % len(models)] for index in range(requests)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda model: ask(url, model, max_tokens), plan))
    wall = time.perf_counter() - started
    latencies = sorted(seconds for seconds, _ in results)
    return {
        "clients": clients,
        "requests_per_s": requests / wall,
        "tokens_per_s": sum(tokens for _, tokens in results) / wall,
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
    }


def server_rss_mib(process: subprocess.Popen) -> float:
    with open(f"/proc/{process.pid}/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kib / 1024


def load_test(
    url: str, models: list[str], process: subprocess.Popen, clients: int, seconds: float, key: str | None = None
) -> dict:
    """`clients` threads asking without pause for `seconds`: every failure counted, and the server's memory
    read at the start and at each quarter of the time."""
    started = time.perf_counter()
    deadline = started + seconds
    done, failed = [0], [0]
    errors: list[str] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        while time.perf_counter() < deadline:
            try:
                ask(url, models[index % len(models)], 16, key)
                outcome = done
            except Exception as error:  # noqa: BLE001 - counted: the figure this test reports
                outcome = failed
                errors.append(f"{type(error).__name__}: {error}")
            with lock:
                outcome[0] += 1

    threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
    memory = [server_rss_mib(process)]
    for thread in threads:
        thread.start()
    for quarter in (1, 2, 3):
        time.sleep(max(0.0, started + seconds * quarter / 4 - time.perf_counter()))
        memory.append(server_rss_mib(process))
    for thread in threads:
        thread.join()
    memory.append(server_rss_mib(process))
    return {"requests": done[0], "failed": failed[0], "errors": errors[:3], "rss_mib": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters-dir", default=None, help="three or more adapters on one base (default: synthetic)")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--load-seconds", type=float, default=20.0)
    parser.add_argument("--port", type=int, default=8711)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    scratch = tempfile.TemporaryDirectory(prefix="qlora-bench-serve-")
    home = Path(args.adapters_dir) if args.adapters_dir else Path(scratch.name)
    folders = sorted(p for p in home.iterdir() if (p / "adapter_config.json").is_file()) if home.is_dir() else []
    if len(folders) < 3:
        home = Path(scratch.name)
        folders = [synthetic_adapter(home / name, seed) for seed, name in enumerate(("alpha", "beta", "gamma"))]
    models = [folder.name for folder in folders[:3]]
    url = f"http://127.0.0.1:{args.port}"
    table = {}
    load = None
    for batching in ("mixed", "switch"):
        process = start_server(home, batching, args.port)
        try:
            ask(url, models[0], 4)  # warm-up
            table[batching] = [measure(url, models, clients, args.requests, args.max_tokens) for clients in CLIENTS]
            if batching == "mixed" and args.load_seconds > 0:
                load = load_test(url, models, process, 16, args.load_seconds)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait()
    print(f"{args.requests} chat requests per level over adapters {', '.join(models)}, max_tokens {args.max_tokens}")
    print(f"{'clients':>7} {'batching':>9} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p95 s':>7} {'speed-up':>9}")
    for mixed, switch in zip(table["mixed"], table["switch"]):
        for name, row in (("mixed", mixed), ("switch", switch)):
            speedup = f"{mixed['requests_per_s'] / switch['requests_per_s']:.1f}x" if name == "mixed" else ""
            print(
                f"{row['clients']:>7} {name:>9} {row['requests_per_s']:>7.2f} {row['tokens_per_s']:>8.1f} "
                f"{row['p50_s']:>7.2f} {row['p95_s']:>7.2f} {speedup:>9}"
            )
    if load is not None:
        print(
            f"load test: 16 clients for {args.load_seconds:g} s: {load['requests']} requests, {load['failed']} failed; "
            f"server memory at each quarter {' -> '.join(f'{mib:.0f}' for mib in load['rss_mib'])} MiB"
        )
    scratch.cleanup()


if __name__ == "__main__":
    main()
