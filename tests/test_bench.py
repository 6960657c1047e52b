"""The training and data benchmarks run end to end on CPU and report what they measured.

No timed assertions: timings belong in the printed tables, not in pass/fail.
"""

import importlib.metadata
import json
import math
from statistics import mean, median

import pytest
from transformers import MistralConfig
from trl import SFTConfig
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from benchmarks import bench
from qlora_cli import plan
from qlora_cli.data import IGNORE_INDEX
from qlora_cli.recipe import TrainSection


def tiny_settings(**changes) -> bench.Settings:
    values = dict(
        shape="tiny",
        examples=300,
        length_cap=256,
        warmup=1,
        batch_size=None,
        max_length=256,
        r=4,
        seed=0,
        device="cpu",
        base_dir="-",
        work_dir="-",
    )
    return bench.Settings(**{**values, **changes})


def test_lengths_are_seeded_alpaca_like_bounded_and_capped():
    lengths = bench.sample_lengths(5000, 2048, seed=0)
    assert lengths == bench.sample_lengths(5000, 2048, seed=0)
    assert lengths != bench.sample_lengths(5000, 2048, seed=1)
    assert median(lengths) < mean(lengths)  # right-skewed: a long tail of long examples
    assert 140 <= median(lengths) <= 200
    assert bench.MIN_TOKENS <= min(lengths) and max(lengths) <= 2048
    # The cap (the smallest max_length of the three arms) clips the same draws, so no arm truncates.
    assert bench.sample_lengths(5000, 2048, seed=0, cap=1024) == [min(length, 1024) for length in lengths]
    short = bench.sample_lengths(5000, 256, seed=0)
    assert max(short) <= 256 and median(short) < mean(short)


def test_synthetic_examples_mask_the_prompt_and_learn_the_response_and_eos():
    examples = bench.synthetic_examples(tiny_settings(length_cap=128), vocab_size=1024, bos_id=1, eos_id=2)
    assert len(examples) == 300
    assert examples == bench.synthetic_examples(tiny_settings(length_cap=128), vocab_size=1024, bos_id=1, eos_id=2)
    for example in examples:
        input_ids, labels = example["input_ids"], example["labels"]
        assert len(input_ids) == len(labels) <= 128
        assert input_ids[0] == 1 and input_ids[-1] == 2 and labels[-1] == 2
        masked = labels.index(next(label for label in labels if label != IGNORE_INDEX))
        assert masked >= 2 and all(label == IGNORE_INDEX for label in labels[:masked])
        assert labels[masked:] == input_ids[masked:]


def test_batches_count_real_tokens_and_fingerprint_examples_however_they_are_batched():
    examples = [
        {"input_ids": [1, 5, 6, 2], "labels": [-100, 5, 6, 2]},
        {"input_ids": [1, 7, 2], "labels": [-100, 7, 2]},
    ]
    padded = bench.TokenCounter(DataCollatorForLanguageModeling(pad_token_id=0))
    padded(examples)
    (record,) = padded.batches
    assert (record.real, record.computed, record.examples, record.rows) == (7, 8, (4, 3), (4, 4))  # one pad
    padding_free = bench.TokenCounter(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True))
    padding_free(examples)
    (flat,) = padding_free.batches
    assert (flat.real, flat.computed, flat.examples, flat.rows) == (7, 7, (4, 3), (7,))
    # A packed row, as TRL's best-fit-decreasing packing hands it over: the same two examples.
    padding_free([{"input_ids": [1, 7, 2, 1, 5, 6, 2], "labels": [-100, 7, 2, -100, 5, 6, 2], "seq_lengths": [3, 4]}])
    packed = padding_free.batches[1]
    assert packed.examples == (3, 4)
    fingerprints = {bench.examples_fingerprint(list(batch.digests)) for batch in (record, flat, packed)}
    assert fingerprints == {
        bench.examples_fingerprint([bench.example_digest(example["input_ids"]) for example in examples])
    }
    assert bench.examples_fingerprint([bench.example_digest([1, 5, 6, 2])]) != bench.examples_fingerprint(
        list(record.digests)
    )


def test_a_run_whose_arms_saw_different_examples_is_refused():
    row = {"arm": "trl", "examples_fingerprint": "sha256:a", "examples": 10, "real_tokens": 99}
    bench.check_same_examples([row], "sha256:a", 10, 99)
    for changed in ({"examples_fingerprint": "sha256:b"}, {"examples": 9}, {"real_tokens": 98}):
        with pytest.raises(RuntimeError, match="arm trl trained on"):
            bench.check_same_examples([{**row, **changed}], "sha256:a", 10, 99)


def test_flop_model_matches_the_performance_model():
    config = MistralConfig().to_dict()  # Mistral-7B's shape
    flops = bench.flop_model(config, r=64)
    pairs = bench.causal_pairs(2048)  # one full row of 2048 tokens
    per_token = pairs / 2048
    # Mistral-7B with r=64 at seq 2048, per token: forward 15.1 GFLOP, recompute 14.8 G, 46.2 G a step with
    # checkpointing, 31.3 G without (2 x parameters x tokens, plus the causal attention pairs).
    assert flops.forward + flops.attention * per_token == pytest.approx(15.1e9, rel=0.01)
    assert flops.recompute + flops.attention * per_token == pytest.approx(14.8e9, rel=0.01)
    assert flops.model_flops(2048, pairs) / 2048 == pytest.approx(31.3e9, rel=0.015)
    assert flops.hardware_flops(2048, pairs, checkpointing=True) / 2048 == pytest.approx(46.2e9, rel=0.015)
    recipe = bench.qlora_recipe(tiny_settings(r=64, max_length=2048))
    assert flops.hardware_flops(2048, pairs, checkpointing=True) / 2048 == pytest.approx(
        plan.flops_per_token(config, recipe), rel=0.01
    )
    # Without padding or recompute the hardware did exactly the model's work; padding and recompute only add.
    assert flops.hardware_flops(1000, 5000, checkpointing=False) == flops.model_flops(1000, 5000)
    padded = flops.hardware_flops(1500, 9000, checkpointing=False)
    assert flops.hardware_flops(1500, 9000, checkpointing=True) > padded > flops.model_flops(1000, 5000)


@pytest.mark.pipeline
def test_training_benchmark_compares_three_arms_on_the_same_examples(tmp_path, capsys):
    report_path, markdown_path = tmp_path / "bench.json", tmp_path / "BENCHMARKS.md"
    bench.main(
        [
            "--shape",
            "tiny",
            "--examples",
            "200",
            "--warmup",
            "1",
            "--json",
            str(report_path),
            "--markdown",
            str(markdown_path),
        ]
    )
    printed = capsys.readouterr().out

    report = json.loads(report_path.read_text())
    tutorial, trl, qlora = rows = report["rows"]
    assert [row["arm"] for row in rows] == ["tutorial", "trl", "qlora"]
    # The same examples and the same real tokens in every arm, each seen once.
    data = report["data"]
    assert data["examples"] == 200 and data["real_tokens"] == report["lengths"]["tokens"]
    for row in rows:
        assert (row["examples_fingerprint"], row["examples"], row["real_tokens"]) == (
            data["fingerprint"],
            200,
            data["real_tokens"],
        )
        assert 0 < row["measured_real_tokens"] < row["real_tokens"]  # the warm-up step is not timed
        assert row["tokens_per_second"] > 0 and 0 < row["mfu"] < row["hfu"]  # checkpointing recomputes; padding costs
        assert row["optimizer_steps"] == math.ceil(row["micro_steps"] / row["config"]["grad_accum"])
        assert row["tokens_per_step"] == pytest.approx(row["real_tokens"] / row["optimizer_steps"])

    # (a) the tutorial settings, (b) TRL's defaults as installed, (c) qlora's schema defaults.
    settings = bench.TUTORIAL  # read back from the trainer that ran
    expected_tutorial = {
        "micro_batch": settings["per_device_train_batch_size"],
        "grad_accum": settings["gradient_accumulation_steps"],
        "optim": settings["optim"],
        "learning_rate": settings["learning_rate"],
        "lr_scheduler": settings["lr_scheduler_type"],
        "max_grad_norm": settings["max_grad_norm"],
        "gradient_checkpointing": settings["activation_checkpointing"],
        "packing": settings["packing"],
        "padding_free": settings["padding_free"],
        "max_length": report["settings"]["max_length"],
    }
    assert {key: tutorial["config"][key] for key in expected_tutorial} == expected_tutorial
    defaults = SFTConfig(output_dir=str(tmp_path / "defaults"), use_cpu=True)
    assert (
        trl["config"]["micro_batch"],
        trl["config"]["grad_accum"],
        trl["config"]["learning_rate"],
        trl["config"]["max_length"],
        trl["config"]["optim"],
        trl["config"]["packing"],
    ) == (
        defaults.per_device_train_batch_size,
        defaults.gradient_accumulation_steps,
        defaults.learning_rate,
        defaults.max_length,
        defaults.optim.value,
        defaults.packing,
    )
    schema = TrainSection.model_fields
    assert (
        qlora["config"]["micro_batch"],
        qlora["config"]["grad_accum"],
        qlora["config"]["optim"],
        qlora["config"]["packing"],
    ) == (
        schema["batch_size"].default,
        schema["grad_accum"].default,
        schema["optim"].default,
        schema["packing"].default,
    )

    # Tokens per optimizer step differ as configured: 16 examples, 8 examples, 16 packed rows of max_length.
    assert tutorial["optimizer_steps"] == math.ceil(200 / 16) and trl["optimizer_steps"] == math.ceil(200 / 8)
    assert qlora["tokens_per_step"] > tutorial["tokens_per_step"] > trl["tokens_per_step"]
    # The padded arms compute padding; qlora's packed, padding-free rows do not.
    assert tutorial["padding_share"] > 0 and trl["padding_share"] > 0 and qlora["padding_share"] == 0
    assert tutorial["computed_tokens"] > tutorial["real_tokens"] == qlora["computed_tokens"]

    for words in ("(a) tutorial", "(b) TRL defaults", "(c) qlora", "tokens/step", "tokens/s", "RSS+ GiB", "MFU", "HFU"):
        assert words in printed
    markdown = markdown_path.read_text()
    assert "python -m benchmarks.bench --shape tiny --examples 200 --warmup 1" in markdown
    for words in (
        "| (a) tutorial |",
        "| (b) TRL defaults |",
        "| (c) qlora |",
        "MFU",
        "HFU",
        "paged_adamw_32bit",
        "adamw_torch_fused",
    ):
        assert words in markdown
    for library in ("torch", "transformers", "peft", "trl", "bitsandbytes"):
        assert f"{library} {importlib.metadata.version(library)}" in markdown


def test_data_benchmark_reports_rows_per_second_for_each_phase():  # tokenizing and packing only: no model
    from rich.console import Console

    from benchmarks import bench_data

    result = bench_data.run(rows=2000, max_length=2048, seed=0)  # in this process: no second start-up
    assert result["rows"] == 2000 and result["tokens"] > 2000 and 0 < result["packing_fill"] <= 1
    assert all(phase["rows_per_second"] > 0 for phase in result["phases"])
    console = Console(width=200, record=True)
    console.print(bench_data.render(result))
    shown = console.export_text()
    assert "rows/s" in shown and "build_dataset" in shown and "pack_dataset" in shown
