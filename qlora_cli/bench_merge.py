"""Benchmark: peak memory of `qlora merge` (shard by shard) against peft's merge_and_unload.

    python -m qlora_cli.bench_merge [--layers 24 --hidden 1536 ...] [--json out.json]
    python -m qlora_cli.bench_merge --small     # seconds-long smoke run

Builds a random Mistral-shaped base (saved as bf16 shards) and a random, non-zero LoRA adapter in
the format `qlora train` writes, then runs each merge in a fresh Python process, so that each peak
RSS is its own, and prints a table. The builders are also the test suite's fixtures, so the format
benchmarked is the format tested.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

METHODS = ("streaming", "merge_and_unload")
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer that knows the words of the alpaca template and of merge's check prompts,
    so those prompts become real token ids instead of a run of <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from qlora_cli.merge import VERIFY_INSTRUCTIONS
    from qlora_cli.prompts import render_prompt

    words = dict.fromkeys(re.findall(r"\w+|[^\w\s]+", " ".join(render_prompt(text) for text in VERIFY_INSTRUCTIONS)))
    fillers = (f"w{number}" for number in range(vocab_size))
    vocabulary = [*SPECIAL_TOKENS, *words]
    vocabulary += [next(fillers) for _ in range(vocab_size - len(vocabulary))]
    tokenizer = Tokenizer(
        models.WordLevel({word: index for index, word in enumerate(vocabulary[:vocab_size])}, unk_token="<unk>")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    )


def build_base(
    folder: Path,
    *,
    layers: int,
    hidden: int,
    intermediate: int,
    vocab: int,
    heads: int,
    kv_heads: int,
    shards: int,
    seed: int = 0,
):
    """A random Mistral-shaped model saved in bf16 as at least `shards` safetensors files; returns it (bf16)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = MistralForCausalLM(config).to(torch.bfloat16)
    total_bytes = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    # save_pretrained closes a shard once it would pass the limit, so a limit a little under an even
    # split always yields at least `shards` files.
    model.save_pretrained(folder, max_shard_size=int(total_bytes / shards * 0.9))
    build_tokenizer(vocab).save_pretrained(folder)
    return model


def build_adapter(
    model,
    base_dir: Path,
    adapter_dir: Path,
    *,
    name: str = "synthetic",
    r: int = 8,
    alpha: float = 16.0,
    compute_dtype: str = "bfloat16",
    seed: int = 0,
) -> Path:
    """A LoRA adapter folder as `qlora train` writes it, with random non-zero lora_B so merging changes weights.
    Takes `model` (from build_base) and wraps it with peft in place."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qlora_cli import adapters
    from qlora_cli.model import base_model_record
    from qlora_cli.recipe import DataSection, LoraSection, ModelSection, Recipe, TrainSection

    torch.manual_seed(seed + 1)
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for parameter_name, parameter in peft_model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(0.0, 0.02)  # the size of the base weights' own init: a clearly visible update
    peft_model.save_pretrained(adapter_dir)
    build_tokenizer(model.config.vocab_size).save_pretrained(adapter_dir)
    section = ModelSection(id=str(Path(base_dir).resolve()), compute_dtype=compute_dtype, device="cpu")
    recipe = Recipe(
        model=section,
        lora=LoraSection(name=name, r=r, alpha=alpha, dropout=0.0),
        data=DataSection(path="synthetic.jsonl"),
        train=TrainSection(output_dir=f"runs/{name}"),
    )
    (adapter_dir / "recipe.yaml").write_text(recipe.to_yaml())
    adapters.write_metadata(
        adapter_dir,
        name=name,
        base=base_model_record(section, Path(base_dir)),
        template="alpaca",
        task="forward",
        lora={"r": r, "alpha": alpha, "target_modules": "all-linear"},
        metrics={},
    )
    return adapter_dir


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


def run_in_fresh_process(method: str, base_dir: Path, adapter_dir: Path, out_dir: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "qlora_cli.bench_merge",
        "--measure",
        method,
        str(base_dir),
        str(adapter_dir),
        str(out_dir),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m qlora_cli.bench_merge", description=__doc__.split("\n")[0])
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
    parser.add_argument("--measure", nargs=4, metavar=("METHOD", "BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure:
        method, base_dir, adapter_dir, out_dir = args.measure
        print(json.dumps(measure(method, Path(base_dir), Path(adapter_dir), Path(out_dir))))
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
        rows = [run_in_fresh_process(method, base_dir, adapter_dir, scratch / method) for method in METHODS]
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
