"""The numbers a run reports are the run's own: the final loss where the curve ends, the last step always
logged, the current loss on the progress bar, a chart that shows a handful of points, this session's speed
after a resume, eval loss as training goes, and a dry run that counts an epoch as the trainer will."""

import json

import numpy as np
import pytest
import torch
from helpers import REPO
from transformers import AutoTokenizer, TrainerControl, TrainerState

from qlora_cli import checkpoints, report
from qlora_cli.data import build_dataset
from qlora_cli.recipe import load_recipe
from qlora_cli.train import EpochSize

TINY_SQL = REPO / "recipes" / "tiny-sql.yaml"
TRAINED_EPOCHS = 2  # tests/conftest.py trains the demo's adapters for two epochs


def state_at(step: int, max_steps: int, tokens: int) -> TrainerState:
    state = TrainerState()
    state.global_step, state.max_steps, state.num_input_tokens_seen = step, max_steps, tokens
    return state


def test_the_tally_sums_each_steps_micro_steps_and_logs_the_last_step():
    tally = report.RunTally()
    tally.on_train_begin(None, state_at(4, 10, 1_000), TrainerControl())  # as a resumed run starts
    for share in (0.25, 0.5):  # two micro-steps of gradient accumulation
        tally.add(torch.tensor(share))
    control = tally.on_step_end(None, state_at(5, 10, 1_300), TrainerControl())
    assert tally.step_loss == 0.75 and not control.should_log
    assert tally.session_tokens(state_at(5, 10, 1_300)) == 300, "tokens restored from before the resume are not ours"
    tally.add(torch.tensor(0.5))
    assert tally.on_step_end(None, state_at(10, 10, 2_000), TrainerControl()).should_log, "the last step is logged"
    stopping = TrainerControl(should_training_stop=True)
    assert tally.on_step_end(None, state_at(7, 10, 1_500), stopping).should_log, "so is the step a signal stops at"


def test_the_progress_bar_shows_the_loss_of_the_step_just_taken():
    tally = report.RunTally()
    progress = report.RichProgress(tally)
    state = state_at(0, 100, 0)
    tally.on_train_begin(None, state, TrainerControl())
    progress.on_train_begin(None, state, TrainerControl())
    try:
        for step, loss in enumerate((2.5, 1.25, 0.5), start=1):
            tally.add(torch.tensor(loss))
            tally.on_step_end(None, state_at(step, 100, 10 * step), TrainerControl())
            progress.on_step_end(None, state_at(step, 100, 10 * step), TrainerControl())
            # No step was logged (logging_steps is 10 by default): the bar still follows the run.
            assert progress.progress.tasks[0].fields["loss"] == f"{loss:.4f}"
    finally:
        progress.on_train_end(None, state, TrainerControl())


def blue_pixels_in_the_loss_plot(history: list[dict]) -> int:
    """Pixels of the train-loss colour inside the loss axes, the legend's sample line left out."""
    figure = report.loss_figure(history)
    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[::-1, :, :3].astype(int)  # rows from the bottom, as bboxes
    axes = figure.axes[0]
    blue = np.abs(image - np.array([31, 119, 180])).sum(axis=2) < 60  # matplotlib's tab:blue
    inside = np.zeros_like(blue)
    box = axes.get_window_extent()
    inside[int(box.y0) : int(box.y1), int(box.x0) : int(box.x1)] = True
    legend = axes.get_legend().get_window_extent()
    inside[int(legend.y0) - 1 : int(legend.y1) + 2, int(legend.x0) - 1 : int(legend.x1) + 2] = False
    return int((blue & inside).sum())


def test_a_run_that_logged_one_or_two_points_still_draws_them():
    one = [{"step": 1, "loss": 2.0, "learning_rate": 1e-4}]
    two = [*one, {"step": 2, "loss": 1.5, "learning_rate": 1e-4}]
    assert blue_pixels_in_the_loss_plot(one) > 20, "a single logged loss is drawn as a point"
    assert blue_pixels_in_the_loss_plot(two) > blue_pixels_in_the_loss_plot(one)


@pytest.mark.pipeline
def test_the_reported_final_loss_is_where_the_curve_ends(trained_adapters):
    run_dir = trained_adapters.parent / "runs" / "sql"
    metrics = json.loads((run_dir / checkpoints.METRICS).read_text())
    history = json.loads((run_dir / checkpoints.LOG_HISTORY).read_text())
    losses = [(entry["step"], round(entry["loss"], 4)) for entry in history if "loss" in entry]  # as metrics round
    assert losses[-1] == (metrics["steps"], metrics["train_loss"]), "the last step is logged, and it is the final loss"
    first = losses[-2][0] + 1  # the logged loss is the mean over the steps since the log before
    assert metrics["train_loss_steps"] == [first, metrics["steps"]]
    # The average over a run that learned sits far above where it ended (two epochs of the demo: 0.60 against 0.24).
    assert metrics["mean_train_loss"] > 2 * metrics["train_loss"]
    report_line = f"final train loss (mean of steps {first}-{metrics['steps']}): {metrics['train_loss']}"
    assert report_line in (run_dir / "report.md").read_text()
    adapter = json.loads((trained_adapters / "sql" / "qlora.json").read_text())
    assert adapter["metrics"]["train_loss"] == metrics["train_loss"]


@pytest.mark.pipeline
def test_eval_loss_comes_as_training_goes(trained_adapters):
    """The tiny recipes evaluate every 50 steps (train.eval_steps): the terminal shows each, and the final
    figure is the one at the last step."""
    run_dir = trained_adapters.parent / "runs" / "sql"
    recipe = load_recipe(TINY_SQL)
    metrics = json.loads((run_dir / checkpoints.METRICS).read_text())
    history = json.loads((run_dir / checkpoints.LOG_HISTORY).read_text())
    evaluated = [entry["step"] for entry in history if "eval_loss" in entry]
    every = recipe.train.eval_steps
    assert evaluated == list(range(every, metrics["steps"] + 1, every)) + [metrics["steps"]]
    terminal = (trained_adapters.parent / "sql.log").read_text()
    for step in range(every, metrics["steps"], every):
        assert f"step {step}  eval loss" in terminal
    assert f"eval loss at step {metrics['steps']}: {metrics['eval_loss']:.4f}" in terminal


@pytest.mark.pipeline
def test_the_dry_run_counts_the_steps_the_trainer_takes(trained_adapters, tiny_base):
    recipe = load_recipe(TINY_SQL)
    data = build_dataset(recipe.data, AutoTokenizer.from_pretrained(tiny_base))
    epoch = EpochSize.count(data.train, recipe)
    trained = json.loads((trained_adapters.parent / "runs" / "sql" / checkpoints.METRICS).read_text())
    assert epoch.steps * TRAINED_EPOCHS == trained["steps"]
    assert epoch.tokens * TRAINED_EPOCHS == trained["tokens_seen"]
    # Without packing each example is a row of its own.
    unpacked = load_recipe(TINY_SQL, ["train.packing=false"])
    assert EpochSize.count(data.train, unpacked).steps == -(-len(data.train) // recipe.train.batch_size)


def test_a_dry_run_needs_no_gpu_and_says_where_everything_goes(run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["train", str(TINY_SQL), "--dry-run", "--set", "model.device=cuda"])
    assert code == 0, err
    flat = " ".join(out.split())
    assert "optimizer steps per epoch at batch 16 x 1 (packed)" in flat
    assert "time per epoch on a GPU: ~" in flat
    assert "run folder runs/sql; adapter adapters/sql" in flat
    assert ("runs on cuda" if torch.cuda.is_available() else "cannot run here: model.device: cuda") in flat
    assert not (tmp_path / "runs").exists() and not (tmp_path / "adapters").exists()
