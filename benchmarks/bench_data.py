"""Benchmark: data preparation speed, from an alpaca JSONL file to packed training rows.

    python -m benchmarks.bench_data [--rows 50000] [--max-length 2048] [--json out.json]

Writes a synthetic alpaca-format file (seeded English-like text, alpaca-like lengths) to a temporary
folder, then times the two passes every `qlora train` run makes before its first step:
`data.build_dataset` (read, check, template, tokenize with the response-only loss mask; several
processes from 20k rows) and TRL's best-fit-decreasing packing, which SFTTrainer runs on that output.
The tokenizer is the shipped tiny base's (recipes/tiny/base) when present, else the same kind of
word-level tokenizer built here: a subword tokenizer would need a download. Word-level tokenizing is
cheaper per word than BPE, so treat the tokenize figure as an upper bound on rows/s.
"""

from __future__ import annotations

import qlora_cli  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads, via the imports below)

# isort: split

import argparse
import json
import logging
import math
import os
import random
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from qlora_cli.recipe import TINY_BASE

log = logging.getLogger(__name__)


# Common English words, most frequent first: sampled with Zipf weights (1/rank) so that text has
# natural-language token statistics (a few very common words, a long tail) rather than uniform noise.
WORDS = """
the of and to a in is that for it as was with be by on not he this are or his from at which but have an
they you were her she there been one all we their has would when if so no will can more about said
what up its into them than only other new some could time these two may then do first any my now such
like our over man me even most made after also did many before must through back years where much your
way well down should because each just those people how too little state good very make world still own
see men work long get here between both life being under never day same another know while last might
us great old year off come since against go came right used take three states himself few house use
during without again place american around however home small found thought went say part once general
high upon school every does got united left number course war until always away something fact though
water less public put think almost hand enough far took head yet government system better set told
nothing night end why called didn't eyes find going look asked later knew point next program city
business give group toward young days let room president side social given present several order national
possible rather second face per among form important often things looking early white case john become
large big need four within felt along children saw best church ever least power development light thing
seemed family interest want members mind country area others done turned although open god service
certain kind problem began different door thus help sense means whole matter perhaps itself york times
human law line above name example action company hands local show whether five history gave today either
act feet across taken past quite anything seen having death experience body word half really week car
field information table data model answer question write explain describe list summary text sentence
""".split()
ZIPF_WEIGHTS = [1 / rank for rank in range(1, len(WORDS) + 1)]


def word_count(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    return max(1, min(cap, round(rng.lognormvariate(math.log(median), sigma))))


def english_like(rng: random.Random, words: int) -> str:
    """`words` words in sentences of 6-20 words: capitalised, with the odd comma, ending in a period."""
    chosen = rng.choices(WORDS, weights=ZIPF_WEIGHTS, k=words)
    sentences, start = [], 0
    while start < words:
        end = min(words, start + rng.randint(6, 20))
        sentence = chosen[start:end]
        if len(sentence) > 8:
            sentence[len(sentence) // 2] += ","
        sentences.append(" ".join(sentence).capitalize() + ".")
        start = end
    return " ".join(sentences)


def synthetic_alpaca(rows: int, seed: int = 0) -> list[dict]:
    """Rows shaped like Stanford Alpaca's 52k: short instructions, an input on ~40% of rows, and
    right-skewed outputs (median ~35 words, a tail to several hundred). The lognormal parameters
    approximate alpaca_data.json's word counts; they are not an exact fit."""
    rng = random.Random(seed)
    data = []
    for _ in range(rows):
        has_input = rng.random() < 0.4
        data.append(
            {
                "instruction": english_like(rng, word_count(rng, median=12, sigma=0.5, cap=120)),
                "input": english_like(rng, word_count(rng, median=15, sigma=0.9, cap=400)) if has_input else "",
                "output": english_like(rng, word_count(rng, median=35, sigma=1.0, cap=800)),
            }
        )
    return data


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load_benchmark_tokenizer():
    """The tiny base's tokenizer, else a word-level one over WORDS and the template; and which it is."""
    from transformers import AutoTokenizer

    from qlora_cli.prompts import render_prompt
    from qlora_cli.testing import build_tokenizer

    if (TINY_BASE / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(TINY_BASE), f"tiny base word-level ({TINY_BASE})"
    texts = [" ".join(WORDS), " ".join(WORDS).capitalize(), render_prompt("x", "y"), render_prompt("x")]
    tokenizer = build_tokenizer(texts)
    return tokenizer, f"word-level built here ({len(tokenizer)} tokens; recipes/tiny/base not found)"


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def run(rows: int, max_length: int, seed: int) -> dict:
    import datasets
    from trl.data_utils import pack_dataset

    from qlora_cli.data import build_dataset, read_rows, row_problem
    from qlora_cli.recipe import DataSection

    datasets.disable_progress_bars()
    tokenizer, tokenizer_name = load_benchmark_tokenizer()
    tokenizer.model_max_length = max_length  # the tiny tokenizers say 256 and would warn on every longer row
    with tempfile.TemporaryDirectory(prefix="qlora-bench-data-") as scratch:
        path = write_jsonl(synthetic_alpaca(rows, seed), Path(scratch) / "alpaca.jsonl")
        section = DataSection.model_validate({"path": str(path), "max_length": max_length})
        log.info(
            "%d synthetic alpaca rows in %s (%.1f MB); tokenizer: %s",
            rows,
            path.name,
            path.stat().st_size / 1e6,
            tokenizer_name,
        )
        read, read_seconds = timed(read_rows, section.path)
        _, check_seconds = timed(lambda rows: [row_problem(row) for row in rows], read)  # what check_data asks
        data, build_seconds = timed(build_dataset, section, tokenizer)
    lengths = [len(ids) for ids in data.train["input_ids"]]
    packed, pack_seconds = timed(pack_dataset, data.train, max_length, strategy="bfd")
    tokens = sum(lengths)
    phases = [
        {"phase": "read + check rows (part of build_dataset)", "seconds": read_seconds + check_seconds, "rows": rows},
        {"phase": "build_dataset (read, check, template, tokenize)", "seconds": build_seconds, "rows": rows},
        {"phase": f"pack_dataset bfd into {max_length}-token rows", "seconds": pack_seconds, "rows": len(data.train)},
        {"phase": "total (build_dataset + pack)", "seconds": build_seconds + pack_seconds, "rows": rows},
    ]
    for phase in phases:
        phase["rows_per_second"] = phase["rows"] / phase["seconds"]
    return {
        "rows": rows,
        "max_length": max_length,
        "tokenizer": tokenizer_name,
        # The same rule as data._tokenize_rows, restated only to label the report.
        "workers": min(os.cpu_count() or 1, 8) if rows >= 20_000 else 1,
        "tokens": tokens,
        "median_tokens_per_row": sorted(lengths)[len(lengths) // 2],
        "max_tokens_per_row": max(lengths),
        "packed_rows": len(packed),
        "packing_fill": tokens / (len(packed) * max_length),
        "phases": phases,
    }


def render(result: dict) -> Table:
    table = Table(
        title=f"data preparation: {result['rows']:,} alpaca rows -> {result['tokens']:,} tokens "
        f"(median {result['median_tokens_per_row']}, max {result['max_tokens_per_row']} per row) -> "
        f"{result['packed_rows']:,} packed rows ({100 * result['packing_fill']:.1f}% full)",
        caption=f"tokenizer: {result['tokenizer']}; tokenizing processes: {result['workers']}",
    )
    for column in ("phase", "seconds", "rows/s"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for phase in result["phases"]:
        table.add_row(phase["phase"], f"{phase['seconds']:.2f}", f"{phase['rows_per_second']:,.0f}")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_data", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--rows", type=int, default=50_000, help="alpaca rows to generate (default 50000, alpaca's size)"
    )
    parser.add_argument("--max-length", type=int, default=2048, help="data.max_length and packed row length in tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    result = run(args.rows, args.max_length, args.seed)
    Console().print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
