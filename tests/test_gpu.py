"""The `gpu` tier: the real stack on CUDA, where the CPU tier cannot reach. scripts/gpu-check.sh runs it on a GPU
box (`pytest -m gpu tests/test_gpu.py`); without CUDA every test here is skipped.

What only a GPU shows: bf16 autocast and bitsandbytes' CUDA kernels in training, paged AdamW (CUDA managed
memory), resume equivalence under bf16 and non-deterministic GPU kernels, the merge checked on the GPU,
generation stopping at EOS there, and a CUDA error inside the generation thread.
"""

import json
import logging
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, finishes_within, qlora, step_losses, write_recipe

from qlora_cli.data import read_jsonl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU; scripts/gpu-check.sh runs this tier on one"
    ),
]

SQL = read_jsonl(TINY / "sql" / "test.jsonl")
GPU = {"device": "cuda", "compute_dtype": "bfloat16"}
STEPS = 80  # about one epoch of the tiny SQL set: the loss falls well and answers end with EOS
HALF = STEPS // 2
KILL_AT = 60  # between the two checkpoints: the resumed run redoes steps 41-60
TRAIN = {
    "max_steps": STEPS,
    "save_steps": HALF,
    "logging_steps": 1,
    "optim": "paged_adamw_32bit",
    "gradient_checkpointing": True,  # the peft + checkpointing path ('element 0 does not require grad') on CUDA
    "report_to": [],
}
# Resume equivalence on a GPU is not bit for bit as on the CPU (tests/test_resume.py, 1e-5): SDPA's backward
# and split-K matmuls accumulate in an order that varies between runs, and a bf16 value keeps 8 significant
# bits, so one such difference moves a value by up to 2^-8 = 0.4% of itself and the two runs drift apart by
# that much per step. 3% of a step's loss is about eight bf16 steps: beyond the drift of 40 steps, and well
# under what a broken resume costs (a fresh optimizer, a reshuffled batch order or a restart from step 0 move
# the loss by 10% to 100% within the first steps after the checkpoint).
RESUME_TOLERANCE = 3e-2
NO_HANG_SECONDS = 120  # generous for a tiny model; only a regression (a reader waiting forever) gets near it
OUT_OF_MEMORY = "CUDA out of memory. Tried to allocate 20.00 GiB (injected by tests/test_gpu.py)"


class Straight:
    """The uninterrupted run: its recipe, run folder and adapter."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.recipe = write_recipe(folder, "gpu-straight", model=GPU, train=TRAIN)
        self.home = folder / "adapters"
        self.run_dir = folder / "runs" / "gpu-straight"
        self.adapter: Path | None = None  # set once trained


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Straight:
    from qlora_cli import train
    from qlora_cli.recipe import load_recipe

    run = Straight(tmp_path_factory.mktemp("gpu"))
    run.adapter = train.run(load_recipe(run.recipe), adapters_dir=str(run.home)).adapter
    return run


@pytest.fixture(scope="module")
def session(straight):
    from qlora_cli.generate import open_session

    return open_session([str(straight.adapter)])


def test_tiny_recipe_trains_on_cuda_in_bf16_with_paged_adamw_and_the_loss_falls(straight, record_property):
    from safetensors.torch import load_file

    losses = step_losses(straight.run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first = statistics.mean(losses[step] for step in range(1, 6))
    last = statistics.mean(losses[step] for step in range(STEPS - 4, STEPS + 1))
    record_property("loss", f"{first:.3f} (steps 1-5) -> {last:.3f} (steps {STEPS - 4}-{STEPS})")
    assert last < 0.5 * first, f"loss fell only from {first:.3f} to {last:.3f}"

    # What the trainer ran with, as it saved it beside the checkpoint.
    args = torch.load(straight.run_dir / f"checkpoint-{STEPS}" / "training_args.bin", weights_only=False)
    assert args.bf16 is True and not args.use_cpu
    assert args.optim == "paged_adamw_32bit"
    metrics = json.loads((straight.run_dir / "metrics.json").read_text())
    assert "GPU" in metrics["peak_memory"], metrics["peak_memory"]
    record_property("peak_memory", metrics["peak_memory"])
    assert metrics["eval_loss"] == metrics["eval_loss"] and metrics["eval_loss"] < first  # finite, and learned

    weights = load_file(straight.adapter / "adapter_model.safetensors")
    assert weights and all(
        tensor.dtype == torch.float32 for tensor in weights.values()
    )  # fp32 adapter under bf16 compute
    assert all(tensor.abs().max() > 0 for key, tensor in weights.items() if "lora_B" in key), (
        "every lora_B must leave zero"
    )


# A `qlora train` that dies by SIGKILL once KILL_AT steps are done, as a preempted box would (fault injection in
# the child only): deterministic, where killing from outside would race a GPU that finishes 80 steps in seconds.
KILLED_AT_STEP = """
import os, signal, sys
from qlora_cli import train
from qlora_cli.cli import main

recipe, home, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
real_training_step = train.CheckpointingTrainer.training_step

def training_step(self, *args, **kwargs):
    if self.state.global_step == step:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_training_step(self, *args, **kwargs)

train.CheckpointingTrainer.training_step = training_step
sys.argv = ["qlora", "train", recipe, "--adapters-dir", home]
main()
"""


def test_kill_9_then_resume_matches_the_straight_run_within_bf16_noise(straight, tmp_path, record_property):
    from qlora_cli import checkpoints

    recipe = write_recipe(tmp_path, "gpu-resumed", model=GPU, train=TRAIN)  # the straight run's recipe, another name
    home, run_dir = tmp_path / "adapters", tmp_path / "runs" / "gpu-resumed"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_AT_STEP, str(recipe), str(home), str(KILL_AT)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert checkpoints.latest_checkpoint(run_dir).name == f"checkpoint-{HALF}"
    assert not (home / "gpu-resumed").exists()

    resumed = qlora("train", str(recipe), "--adapters-dir", str(home), "--resume", cwd=REPO, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = step_losses(straight.run_dir), step_losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    relative = {step: abs(got[step] - expected[step]) / expected[step] for step in expected}
    worst = max(relative, key=relative.get)
    record_property(
        "resume",
        f"largest per-step loss difference {relative[worst]:.2e} of the loss (step {worst}); "
        f"after the resume {max(relative[step] for step in range(HALF + 1, STEPS + 1)):.2e}",
    )
    assert relative[worst] <= RESUME_TOLERANCE, f"step {worst}: {got[worst]} resumed against {expected[worst]} straight"
    assert (home / "gpu-resumed" / "adapter_model.safetensors").is_file()


def test_merge_on_cuda_is_verified_and_answers_what_the_adapter_answers(
    straight, session, tmp_path, caplog, record_property
):
    from transformers import AutoModelForCausalLM

    from qlora_cli import merge
    from qlora_cli.generate import Sampling, Session

    with caplog.at_level(logging.INFO, logger="qlora_cli.merge"):
        summary = merge.run(str(straight.adapter), tmp_path / "merged")
    assert summary.verified is True, summary
    assert summary.source == "nf4" and summary.dtype == "bfloat16"
    assert summary.relative_logit_diff <= merge.DEFAULT_TOLERANCE[torch.bfloat16]
    placed = [
        record.getMessage() for record in caplog.records if "verifying the merged model on" in record.getMessage()
    ]
    # Checked on the GPU, nothing offloaded.
    assert placed and "cpu" not in placed[0] and "disk" not in placed[0], placed
    record_property("merge", f"relative logit difference {summary.relative_logit_diff:.3g} ({placed[0]})")

    # Independently: the merged model alone, plain transformers on the GPU, answers what 4-bit base + adapter answers.
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.bfloat16, device_map={"": 0})
    name = session.names[1]
    rows, sampling = SQL[:16], Sampling(max_new_tokens=64)
    alone = Session(model=merged, tokenizer=session.tokenizer, base_id="merged", styles={name: session.styles[name]})
    adapter_answers, merged_answers = session.ask(rows, name, sampling), alone.ask(rows, name, sampling)
    agreed = sum(a == b for a, b in zip(adapter_answers, merged_answers))
    record_property("merged_answers", f"{agreed}/{len(rows)} identical to base+adapter")
    # bf16 rounds the merged weight once where base+adapter rounds two products: a near-tie between two tokens may
    # tip the other way in a few answers, never in most.
    assert agreed >= 0.75 * len(rows), list(zip(adapter_answers, merged_answers))


def test_generation_stops_at_eos_on_cuda(session, record_property):
    from qlora_cli.generate import Sampling

    name, tokenizer, model = session.names[1], session.tokenizer, session.model
    rows, limit = SQL[:16], 96
    tokenizer.padding_side = "left"
    batch = tokenizer([session.prompt(row, name) for row in rows], return_tensors="pt", padding=True).to(model.device)
    assert model.device.type == "cuda"
    with session.using(name), torch.inference_mode():
        output = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=limit,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    generated = output[:, batch["input_ids"].shape[1] :].tolist()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    lengths = []
    for tokens in generated:
        assert eos in tokens, f"never stopped: {tokenizer.decode(tokens)!r}"
        end = tokens.index(eos)
        assert all(token == pad for token in tokens[end + 1 :]), "tokens after EOS"
        lengths.append(end + 1)
    assert len(generated[0]) == max(lengths) < limit  # generate stopped once every row had its EOS
    record_property("eos", f"every answer ended with EOS after {min(lengths)}-{max(lengths)} tokens (limit {limit})")
    # qlora's own path gives the same answers, cut at EOS.
    answers = session.ask(rows, name, Sampling(max_new_tokens=limit))
    assert answers == [
        tokenizer.decode(tokens[: tokens.index(eos)], skip_special_tokens=True).strip() for tokens in generated
    ]


def fail_after_first_token(calls: list):
    """A forward hook: the prompt's pass (which yields the first token) runs, the next raises a CUDA OOM."""

    def hook(module, args, output):
        calls.append(1)
        if len(calls) > 1:
            raise torch.cuda.OutOfMemoryError(OUT_OF_MEMORY)

    return hook


def test_an_injected_cuda_error_in_the_generation_thread_surfaces_as_one_qlora_error(session):
    from qlora_cli.errors import QloraError
    from qlora_cli.generate import Sampling

    name, calls = session.names[1], []
    # PeftModel.generate calls the wrapped transformers model once per token: hook that one.
    handle = session.model.get_base_model().register_forward_hook(fail_after_first_token(calls))
    try:
        outcome = finishes_within(
            NO_HANG_SECONDS, lambda: list(session.stream(SQL[0], name, Sampling(max_new_tokens=32)))
        )
    finally:
        handle.remove()
    assert isinstance(outcome.get("error"), QloraError), outcome
    assert str(outcome["error"]) == (
        f"generation with adapter {name!r} ran out of memory ({OUT_OF_MEMORY}); "
        "lower --max-new-tokens, use fewer adapters at once, or free the GPU"
    )
    assert len(calls) == 2  # it failed at the second token, not before generation started


def test_an_injected_cuda_error_makes_qlora_generate_exit_1_with_one_line(straight, monkeypatch, capsys):
    from qlora_cli import generate
    from qlora_cli.cli import main

    calls: list = []
    real_load_model = generate.load_model

    def load_model_that_fails_at_the_second_token(*args, **kwargs):  # fault injection into the loaded base
        model = real_load_model(*args, **kwargs)
        model.register_forward_hook(fail_after_first_token(calls))
        return model

    monkeypatch.setattr(generate, "load_model", load_model_that_fails_at_the_second_token)
    monkeypatch.setattr(
        sys,
        "argv",
        ["qlora", "generate", "-a", str(straight.adapter), SQL[0]["instruction"], "--input", SQL[0]["input"]],
    )
    outcome = finishes_within(NO_HANG_SECONDS, main)
    captured = capsys.readouterr()
    assert isinstance(outcome.get("error"), SystemExit) and outcome["error"].code == 1, (outcome, captured.err[-2000:])
    said = " ".join(captured.err.split())
    assert said.startswith("error: generation with adapter") and f"ran out of memory ({OUT_OF_MEMORY}); " in said
    assert "Traceback" not in captured.err
    assert len(calls) == 2
