"""What a run leaves for people to look at: a live progress line, a loss curve, a short report."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

log = logging.getLogger(__name__)


class RunTally(TrainerCallback):
    """What a run says about itself, measured as it goes, on every rank.

    The loss of the latest optimizer step: callbacks never see the loss, so the trainer hands each
    micro-step's share to `add` (their sum is the step's loss, as the trainer's own logging sums them).
    The tokens and seconds of this session: a resumed run restores the tokens seen before it, which
    were not trained in the time it measures. And the last step is always logged, so that the curve,
    the report and the progress bar end where the run ended. Under a multi-process launch the step loss
    is the main process's own batch (no collective per step); the logged loss is the mean over all."""

    def __init__(self) -> None:
        self.step_loss: float | None = None
        self._micro_steps: list = []
        self.tokens_at_start = 0
        self.started = 0.0

    def add(self, loss) -> None:
        self._micro_steps.append(loss.detach())

    def on_train_begin(self, args, state, control, **kwargs):
        # The trainer restores a checkpoint's state before this call.
        self.tokens_at_start, self.started = state.num_input_tokens_seen, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._micro_steps:
            self.step_loss = float(sum(loss.float() for loss in self._micro_steps))
            self._micro_steps = []
        if state.global_step >= state.max_steps or control.should_training_stop:
            control.should_log = True
        return control

    def session_tokens(self, state) -> int:
        return state.num_input_tokens_seen - self.tokens_at_start

    def session_speed(self, state) -> float:
        """Tokens per second since this session started."""
        return self.session_tokens(state) / max(time.perf_counter() - self.started, 1e-9)


class RichProgress(TrainerCallback):
    """One progress bar with the current step's loss, tokens/s and ETA; log lines above it instead of raw dicts."""

    def __init__(self, tally: RunTally) -> None:
        self.tally = tally
        self.progress: Progress | None = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.progress.add_task(
            "train", total=state.max_steps, completed=state.global_step, loss="-", speed="-"
        )
        self.progress.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            loss = "-" if self.tally.step_loss is None else f"{self.tally.step_loss:.4f}"
            speed = f"{self.tally.session_speed(state):,.0f}"
            self.progress.update(self.task, completed=state.global_step, loss=loss, speed=speed)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        if "loss" in logs:
            self.progress.console.print(
                f"step {state.global_step}/{state.max_steps}  loss {logs['loss']:.4f}  lr {logs.get('learning_rate', 0):.2e}"
                + (
                    # DPO: how often the chosen answer gained on the rejected one, and by how much
                    f"  preferred {logs['rewards/accuracies']:.3f}  margin {logs['rewards/margins']:.3f}"
                    if "rewards/accuracies" in logs
                    else f"  token accuracy {logs['mean_token_accuracy']:.3f}"
                    if "mean_token_accuracy" in logs
                    else ""
                ),
                highlight=False,
            )
        elif "eval_loss" in logs:
            self.progress.console.print(f"step {state.global_step}  eval loss {logs['eval_loss']:.4f}", highlight=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def final_train_loss(log_history: list[dict]) -> tuple[int, int, float] | None:
    """(first step, last step, loss) of the last logged training loss, the mean over the steps since the log
    before it: where the curve ends. The trainer's own `training_loss` is the average over the whole run,
    far above it on a run that learned."""
    steps = [entry["step"] for entry in log_history if "loss" in entry]
    if not steps:
        return None
    last = next(entry for entry in reversed(log_history) if "loss" in entry)
    return (steps[-2] + 1 if len(steps) > 1 else 1), last["step"], last["loss"]


# Below this many points a line alone says little (one point draws nothing): each point gets a marker.
MARKED_POINTS = 30


def loss_figure(log_history: list[dict]):
    """Loss (train and eval) and learning rate against steps, as a matplotlib figure; None before any loss."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training boxes
    import matplotlib.pyplot as plt

    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    rates = [(entry["step"], entry["learning_rate"]) for entry in log_history if "learning_rate" in entry]
    figure, (loss_axis, rate_axis) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[3, 1])
    loss_axis.plot(*zip(*train), "o-" if len(train) < MARKED_POINTS else "-", label="train loss", color="tab:blue")
    if evaluation:
        loss_axis.plot(*zip(*evaluation), "o-", label="eval loss", color="tab:orange")
    step, loss = train[-1]
    loss_axis.annotate(f"{loss:.4g}", (step, loss), textcoords="offset points", xytext=(4, 6), fontsize=8)
    loss_axis.set_ylabel("loss (response tokens)")
    loss_axis.grid(alpha=0.3)
    loss_axis.legend()
    if rates:
        rate_axis.plot(*zip(*rates), "o-" if len(rates) < MARKED_POINTS else "-", color="tab:green")
    rate_axis.set_ylabel("learning rate")
    rate_axis.set_xlabel("optimizer step")
    rate_axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_curves(log_history: list[dict], path: Path) -> Path | None:
    """The loss figure as a PNG at `path`; None when nothing was logged."""
    figure = loss_figure(log_history)
    if figure is None:
        return None
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(
    run_dir: Path, *, recipe, metrics: dict, trainable: int, total: int, adapter_dir: Path, curve: Path | None
) -> Path:
    from qlora_cli.lora import human_count

    lines = [
        f"# Run {recipe.lora.name}",
        "",
        f"- model: `{recipe.model.id}` ({'4-bit ' + recipe.model.quant_type if recipe.model.load_in_4bit else recipe.model.compute_dtype})",
        f"- adapter: LoRA r={recipe.lora.r}, alpha={recipe.lora.alpha}, targets {recipe.lora.target_modules}; "
        f"trainable {human_count(trainable)} of {human_count(total)} ({100 * trainable / total:.2f}%)",
        f"- data: `{recipe.data.path}`, {metrics['examples']} examples ({metrics['dropped_examples']} dropped), max length {recipe.data.max_length}",
        f"- training: {metrics['steps']} steps, lr {recipe.train.lr}, batch {recipe.train.batch_size} x {recipe.train.grad_accum}, {recipe.train.optim}",
        f"- tokens seen: {metrics['tokens_seen']:,}{_session(metrics)}; {metrics['tokens_per_second']:,.0f} tokens/s "
        f"over {metrics['train_seconds']} s",
        f"- peak memory: {metrics['peak_memory']}",
        f"- final train loss ({_window(metrics)}): {metrics['train_loss']}; "
        f"average over the run: {metrics['mean_train_loss']}"
        + (f"; eval loss: {metrics['eval_loss']}" if "eval_loss" in metrics else ""),
        f"- adapter: `{adapter_dir}`",
        "",
    ]
    if curve is not None:
        lines += [f"![loss and learning rate]({curve.name})", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _window(metrics: dict) -> str:
    first, last = metrics.get("train_loss_steps", (metrics["steps"], metrics["steps"]))
    return f"step {last}" if first == last else f"mean of steps {first}-{last}"


def _session(metrics: dict) -> str:
    resumed = metrics.get("resumed_at_step")
    return f" ({metrics['session_tokens']:,} since the resume at step {resumed})" if resumed else ""


def peak_memory() -> str:
    import resource

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU (torch.cuda.max_memory_allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RAM (peak RSS)"
