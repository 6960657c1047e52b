"""The training and data benchmarks run end to end on CPU and report what they measured.

No timed assertions: timings belong in the printed tables, not in pass/fail.
"""

import importlib.metadata
import json
import subprocess
import sys
from statistics import mean, median

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from conftest import REPO
from qlora_cli import bench
from qlora_cli.data import IGNORE_INDEX

pytestmark = pytest.mark.pipeline


def small_settings(**changes) -> bench.Settings:
    values = dict(shape="small", steps=2, warmup=1, batch_size=2, max_length=256, r=8, seed=0, device="cpu", base_dir="-", work_dir="-")
    return bench.Settings(**{**values, **changes})


def test_lengths_are_seeded_alpaca_like_and_bounded():
    lengths = bench.sample_lengths(5000, 2048, seed=0)
    assert lengths == bench.sample_lengths(5000, 2048, seed=0)
    assert lengths != bench.sample_lengths(5000, 2048, seed=1)
    assert median(lengths) < mean(lengths)  # right-skewed: a long tail of long examples
    assert 140 <= median(lengths) <= 200
    assert bench.MIN_TOKENS <= min(lengths) and max(lengths) <= 2048
    short = bench.sample_lengths(5000, 256, seed=0)
    assert max(short) <= 256 and median(short) < mean(short)


def test_synthetic_examples_mask_the_prompt_and_learn_the_response_and_eos():
    examples = bench.synthetic_examples(300, small_settings(), vocab_size=1024, bos_id=1, eos_id=2)
    for example in examples:
        input_ids, labels = example["input_ids"], example["labels"]
        assert len(input_ids) == len(labels) <= 256
        assert input_ids[0] == 1 and input_ids[-1] == 2 and labels[-1] == 2
        masked = labels.index(next(label for label in labels if label != IGNORE_INDEX))
        assert masked >= 2 and all(label == IGNORE_INDEX for label in labels[:masked])
        assert labels[masked:] == input_ids[masked:]


def test_real_tokens_leave_padding_out():
    examples = [{"input_ids": [1, 5, 6, 2], "labels": [-100, 5, 6, 2]}, {"input_ids": [1, 7, 2], "labels": [-100, 7, 2]}]
    padded = bench.TokenCounter(DataCollatorForLanguageModeling(pad_token_id=0))
    padded(examples)
    assert padded.batches == [(7, 8)]  # 7 real tokens, 8 computed: one pad
    padding_free = bench.TokenCounter(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True))
    padding_free(examples)
    assert padding_free.batches == [(7, 7)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert bench.real_tokens({"input_ids": torch.zeros(2, 5), "attention_mask": mask}) == (8, 10)


def test_training_benchmark_runs_both_arms_and_reports(tmp_path):
    report_path, markdown_path = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md"
    command = [
        sys.executable, "-m", "qlora_cli.bench", "--shape", "small", "--steps", "2", "--warmup", "1", "--batch-size", "2",
        "--json", str(report_path), "--markdown", str(markdown_path),
    ]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]

    report = json.loads(report_path.read_text())
    plain, qlora = report["rows"]
    assert (plain["arm"], qlora["arm"]) == ("plain", "qlora")
    assert plain["tokens_per_second"] > 0 and qlora["tokens_per_second"] > 0
    assert plain["padding_share"] > 0 and qlora["padding_share"] == 0  # padded batches against packed rows
    assert (plain["packing"], qlora["packing"]) == (False, True)
    assert len(qlora["step_seconds_all"]) == 3
    for header in ("tokens/s", "speed-up", "peak RSS+ GiB", "% of ceiling", "(a) plain", "(b) qlora"):
        assert header in completed.stdout

    markdown = markdown_path.read_text()
    assert "python -m qlora_cli.bench --shape small --steps 2 --warmup 1 --batch-size 2" in markdown
    for library in ("torch", "transformers", "peft", "trl", "bitsandbytes"):
        assert f"{library} {importlib.metadata.version(library)}" in markdown


def test_data_benchmark_prints_rows_per_second():
    command = [sys.executable, "-m", "qlora_cli.bench_data", "--rows", "2000"]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "rows/s" in completed.stdout
    assert "build_dataset" in completed.stdout and "pack_dataset" in completed.stdout
