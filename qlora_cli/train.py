"""Stage `train`: the one orchestration, top to bottom. TRL's SFTTrainer (or DPOTrainer) owns the loop."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate import PartialState
from datasets import Dataset
from rich.console import Console
from rich.text import Text
from transformers import PrinterCallback, TrainerCallback, set_seed
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from qlora_cli import adapters, checkpoints
from qlora_cli.data import IGNORE_INDEX, TrainingData, build_dataset, check_section
from qlora_cli.errors import ExitCode, QloraError
from qlora_cli.files import atomic_directory, refuse_dangerous_output
from qlora_cli.lora import (
    BASE_REWRITING,
    attach_lora,
    check_target_modules,
    continue_adapter,
    human_count,
    lora_config,
)
from qlora_cli.model import (
    base_model_record,
    check_device,
    empty_model,
    fingerprint_weights,
    load_model,
    load_tokenizer,
    resolve_model_dir,
    sharded_launch,
    weight_files,
    zero3_launch,
)
from qlora_cli.preflight import check_method, check_outputs, check_parent, check_parent_base, resume_command
from qlora_cli.prompts import Renderer, Style
from qlora_cli.recipe import Recipe
from qlora_cli.report import RichProgress, RunTally, final_train_loss, peak_memory, plot_curves, write_report

log = logging.getLogger(__name__)
console = Console()


def sft_config(recipe: Recipe, *, use_cpu: bool) -> SFTConfig:
    train = recipe.train
    return SFTConfig(
        **trainer_arguments(recipe, use_cpu=use_cpu),
        # Best-fit-decreasing packing implies padding-free batches: position ids restart at each example.
        # Flex attention (model.attn_implementation: auto, on CUDA) takes them as a BlockMask; sdpa as a dense
        # block-diagonal mask. Either way no example attends to another (tests/test_fastpath.py).
        packing=train.packing,
        packing_strategy="bfd",
        eval_packing=False,
        use_liger_kernel=train.liger_kernel and not use_cpu and importlib.util.find_spec("liger_kernel") is not None,
        # Our dataset arrives tokenized, truncated and labelled; the trainer only has to pack it.
        dataset_kwargs={"skip_prepare_dataset": not train.packing},
        activation_offloading=train.activation_offloading and not use_cpu,
    )


def dpo_config(recipe: Recipe, *, use_cpu: bool) -> DPOConfig:
    """DPO with the reference inside the model: TRL adds a frozen copy of the starting adapter ("ref") beside
    the trained one; for a new adapter that copy's update is zero, so the reference is the base."""
    return DPOConfig(
        **trainer_arguments(recipe, use_cpu=use_cpu),
        beta=recipe.train.beta,
        activation_offloading=recipe.train.activation_offloading and not use_cpu,
    )


def orpo_config(recipe: Recipe, *, use_cpu: bool):
    """ORPO has no reference at all: the odds ratio of chosen over rejected, weighted by train.beta, is added to
    the chosen answer's own loss. TRL keeps it among its experimental trainers."""
    from trl.experimental.orpo import ORPOConfig

    return ORPOConfig(**trainer_arguments(recipe, use_cpu=use_cpu), beta=recipe.train.beta, remove_unused_columns=False)


def trainer_arguments(recipe: Recipe, *, use_cpu: bool) -> dict:
    """What SFT, DPO and ORPO runs share: schedule, optimizer, checkpoints, precision, logging."""
    train = recipe.train
    return dict(
        output_dir=train.output_dir,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        lr_scheduler_type=train.scheduler,
        warmup_steps=train.warmup_ratio,  # a float below 1 is read as a share of all steps
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optim,
        # Checkpointing is already wired by attach_lora (non-reentrant, inputs requiring grad).
        gradient_checkpointing=False,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        logging_first_step=True,  # and RunTally logs the last step: the curve spans the whole run
        eval_strategy="steps" if train.eval_steps else "no",
        eval_steps=train.eval_steps,
        save_steps=train.save_steps,
        save_total_limit=None,  # CheckpointingTrainer prunes, and only after a newer checkpoint is complete
        bf16=recipe.model.compute_dtype == "bfloat16" and not use_cpu,
        fp16=recipe.model.compute_dtype == "float16" and not use_cpu,
        use_cpu=use_cpu,
        max_length=recipe.data.max_length,
        report_to=[tracker for tracker in train.report_to if importlib.util.find_spec(tracker) is not None] or "none",
        disable_tqdm=True,  # report.RichProgress shows one bar with loss, tokens/s and ETA instead
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
    )


class StopOnSignal(TrainerCallback):
    """Spot machines send SIGTERM 30 s to 2 min before they vanish: finish the step, save, stop."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def handle(self, signum: int, frame) -> None:
        if self.signum is None:
            log.warning(
                "%s received: saving a checkpoint at the end of this step, then stopping", signal.Signals(signum).name
            )
            self.signum = signum
        else:
            log.warning(
                "%s received again: still saving the checkpoint; it stays atomic if you kill -9 now",
                signal.Signals(signum).name,
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


# fp16's grad scaler starts at 2^16 and halves its scale on every step whose gradients overflowed, skipping
# that step: a run can legitimately see a couple of dozen such steps in a row while it finds its scale.
FP16_OVERFLOWS_TOLERATED = 24


class DivergenceGuard:
    """Stop on a non-finite loss, unless it is one of a tolerated run of them (fp16 overflow steps, which
    the grad scaler skips). Any finite loss ends the run."""

    def __init__(self, tolerated: int) -> None:
        self.tolerated = tolerated
        self.in_a_row = 0

    def must_stop(self, finite: bool) -> bool:
        self.in_a_row = 0 if finite else self.in_a_row + 1
        if 0 < self.in_a_row <= self.tolerated:
            log.warning(
                "non-finite loss (%d in a row): the fp16 grad scaler skips this step and lowers its scale",
                self.in_a_row,
            )
        return self.in_a_row > self.tolerated


class GuardedTraining:
    """Atomic checkpoints and a loss that must stay finite, for TRL's trainers (mixed in before them).

    Overriding two methods is the narrowest hook: a callback runs only after a checkpoint is already
    written in place, and never sees the per-step loss. `save_limit` is how many complete checkpoints
    to keep (train.save_limit): the trainer's own save_total_limit would prune before a save is sealed.
    """

    def __init__(
        self,
        *args,
        save_limit: int,
        tally: RunTally | None = None,
        lora_plus_ratio: float | None = None,
        **kwargs,
    ) -> None:
        self.lora_plus_ratio = lora_plus_ratio  # read by create_optimizer, which the parent may call
        super().__init__(*args, **kwargs)
        self.save_limit = save_limit
        self.tally = tally
        # SFTTrainer has just cast a 4-bit model's adapter weights to bf16. In bf16 an Adam update below
        # 1/256 of a weight rounds away, so late, small-LR steps are lost and a checkpoint no longer holds
        # the exact state (a resumed run drifts from the uninterrupted one). Back to fp32, before the
        # optimizer exists: adapters are under 1% of the model, `qlora plan` counts them in fp32, and
        # under bf16 autocast their matmuls still run in bf16.
        self.divergence = DivergenceGuard(tolerated=FP16_OVERFLOWS_TOLERATED if self.args.fp16 else 0)
        # Not under FSDP/ZeRO-3, which shard one dtype per wrapped unit (lora.attach_lora keeps it uniform).
        if not sharded_launch():
            for param in self.model.parameters():
                if param.requires_grad and param.dtype != torch.float32:
                    param.data = param.data.float()

    def create_optimizer(self, model=None):
        """LoRA+: the recipe's optimizer (paged AdamW by default) with the B matrices in a parameter group of
        their own, at lr x lora_plus_ratio. Built here, so checkpoints save and restore its state as usual."""
        if self.lora_plus_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        # The model transformers hands over (FSDP-wrapped when the optimizer is created after wrapping).
        model = model if model is not None else self.model
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
        kwargs = {key: value for key, value in kwargs.items() if key != "lr"}
        self.optimizer = create_loraplus_optimizer(
            model,
            optimizer_cls,
            lr=self.args.learning_rate,
            loraplus_lr_ratio=self.lora_plus_ratio,
            loraplus_weight_decay=self.args.weight_decay,
            **kwargs,
        )
        return self.optimizer

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self.args.output_dir)
        staged = checkpoints.staging_dir(run_dir) / f"checkpoint-{self.state.global_step}"
        self.args.output_dir = str(staged.parent)  # the trainer derives the checkpoint folder from it
        try:
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()  # other ranks write their RNG states into the same folder
            if self.args.should_save:
                checkpoints.commit(staged, run_dir, keep=self.save_limit)
        except OSError as error:
            shutil.rmtree(staged, ignore_errors=True)
            previous = checkpoints.latest_checkpoint(run_dir)
            kept = f"; {previous.name} is intact" if previous else ""
            raise QloraError(
                f"cannot write checkpoint-{self.state.global_step} in {run_dir}: {error.strerror or error}{kept}"
            ) from None
        finally:
            self.args.output_dir = str(run_dir)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.tally is not None:
            self.tally.add(loss)
        if self.divergence.must_stop(bool(torch.isfinite(loss).all())):
            step = self.state.global_step + 1
            last = checkpoints.latest_checkpoint(Path(self.args.output_dir))
            kept = f"last good checkpoint: {last}" if last else "no checkpoint was saved yet"
            raise QloraError(
                f"loss became {loss.item()} at step {step}; stopped without exporting an adapter ({kept}). "
                "Lower train.lr or check the data",
                exit_code=ExitCode.DIVERGED,
            )
        return loss


class CheckpointingTrainer(GuardedTraining, SFTTrainer):
    """Supervised fine-tuning: TRL's SFTTrainer with qlora's checkpoints and guards."""


def odds_ratio_trainer(**kwargs):
    """ORPO: TRL's ORPOTrainer with qlora's checkpoints and guards, on the pairs build_dataset tokenized
    (imported on demand: TRL's experimental package warns when loaded)."""
    from trl.experimental.orpo import ORPOTrainer

    class OddsRatioTrainer(GuardedTraining, ORPOTrainer):
        def _track_num_input_tokens(self, inputs) -> None:
            # transformers counts `input_ids`; ORPO's batches hold each pair as chosen_* and rejected_*, and
            # both run through the model.
            if self.args.include_num_input_tokens_seen == "no":
                return
            tokens = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
            tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

        def tokenize_row(self, feature, model=None) -> dict:
            prompt = feature["prompt_ids"]
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                answer = feature[f"{side}_ids"][: max(0, self.max_length - len(prompt))]
                row[f"{side}_input_ids"] = prompt + answer
                row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
                row[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
            return row

    return OddsRatioTrainer(**kwargs)


class PreferenceTrainer(GuardedTraining, DPOTrainer):
    """DPO: TRL's DPOTrainer with qlora's checkpoints and guards, on pairs build_dataset already rendered
    and tokenized (prompt_ids, chosen_ids, rejected_ids) with the adapter's own template."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


@dataclass(frozen=True)
class Trained:
    """What `train.run` wrote: the adapter, and the run folder with its report."""

    name: str
    adapter: Path
    run_dir: Path
    report: Path
    metrics: dict[str, int | float | str]


def render(trained: Trained) -> str:
    return f"adapter {trained.name!r} written to {trained.adapter}; report: {trained.report}"


def run(
    recipe: Recipe,
    *,
    adapters_dir: str | None = None,
    force: bool = False,
    resume: bool = False,
    dry_run: bool = False,
    source: Path | None = None,
) -> Trained | None:
    """Train as the recipe says; None for a dry run, and on every rank but the main one of a launch.
    `source` is the recipe file, recorded in the adapter."""
    source = checkpoints.original_recipe(source)
    adapter_dir = adapters.adapter_path(recipe.lora.name, adapters_dir)
    run_dir = Path(recipe.train.output_dir)
    # Under `accelerate launch` every rank runs this function; only the main one writes files.
    ranks = PartialState()
    if not ranks.is_main_process:
        logging.getLogger("qlora_cli").setLevel(logging.WARNING)
    resume_from = None
    if not dry_run:
        resume_from = check_outputs(recipe, adapters_dir=adapters_dir, force=force, resume=resume, source=source)
        ranks.wait_for_everyone()  # every rank has checked the outputs before the main one creates them
    # A dry run needs only the config and tokenizer: it runs on a laptop, and says where the real run must.
    device = None if dry_run else check_device(recipe.model)
    check_sharding(recipe)
    checked = check_section(recipe.data)  # every data problem at once, before the model is fetched
    check_method(recipe, checked)
    parent = check_parent(recipe.lora, adapters_dir) if recipe.lora.init_from is not None else None
    if recipe.lora.use_dora:  # said now, not when someone tries to deploy it
        log.warning(
            "lora.use_dora: vLLM and SGLang do not serve DoRA adapters; serve it with qlora serve, or merge it "
            "(qlora merge) for them"
        )
    model_dir = resolve_model_dir(recipe.model, weights=not dry_run)
    if parent is not None and weight_files(model_dir):  # a dry run may have no weights to compare
        check_parent_base(recipe.lora, parent, recipe.model.id, fingerprint_weights(model_dir))
    tokenizer = load_tokenizer(model_dir, recipe.model)
    data = build_dataset(
        recipe.data,
        tokenizer,
        seed=recipe.train.seed,
        checked=checked,
        model_name=recipe.model.id,
        style=parent.style if parent else None,
    )
    log.info("data: %d training examples%s", len(data.train), f", {len(data.eval)} for evaluation" if data.eval else "")
    skeleton = empty_model(recipe.model, model_dir)
    check_target_modules(skeleton, recipe.lora)  # before spending minutes loading weights
    if dry_run:
        show_dry_run(recipe, skeleton, tokenizer, data, adapter_dir=adapter_dir, processes=ranks.num_processes)
        return None

    base_record = base_model_record(recipe.model, model_dir)
    # DPO and ORPO batches are padded pairs, never packed.
    packed = recipe.train.packing and recipe.train.method == "sft"
    model = load_model(recipe.model, model_dir, device=device, packed=packed)
    set_seed(recipe.train.seed)  # LoRA A is randomly initialised here, before the trainer seeds anything
    if parent is not None:
        model = continue_adapter(model, parent.folder, gradient_checkpointing=recipe.train.gradient_checkpointing)
    else:
        model = attach_lora(
            model, recipe.lora, gradient_checkpointing=recipe.train.gradient_checkpointing, model_dir=model_dir
        )
    if ranks.is_main_process:
        if resume_from is None:
            _start_run_dir(run_dir, recipe, force=force, source=source)
        checkpoints.discard_staging(run_dir)  # a save cut off by a crash: never visible, now gone
        if recipe.lora.init in BASE_REWRITING and resume_from is None:
            # The adapter as initialised: at export, peft subtracts it to turn the trained adapter into plain
            # LoRA deltas on the original base. A resumed run initialises the same way (seeded) and keeps the
            # one its first session saved.
            save_initial_adapter(model, run_dir / INITIAL_ADAPTER)
    ranks.wait_for_everyone()
    datasets.disable_progress_bars()  # the trainer's packing pass is quick; our own tokenizing bar was shown
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")  # read by transformers' TensorBoard callback
    stopper, tally = StopOnSignal(), RunTally()
    use_cpu = device.type == "cpu"
    make_trainer, make_config = {
        "sft": (CheckpointingTrainer, sft_config),
        "dpo": (PreferenceTrainer, dpo_config),
        "orpo": (odds_ratio_trainer, orpo_config),
    }[recipe.train.method]
    trainer = make_trainer(
        model=model,
        args=make_config(recipe, use_cpu=use_cpu),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        callbacks=[stopper, tally, RichProgress(tally)],  # tally after stopper: a stop is logged
        save_limit=recipe.train.save_limit,
        tally=tally,
        lora_plus_ratio=recipe.lora.lora_plus_ratio,
    )
    trainer.remove_callback(PrinterCallback)  # raw metric dicts; RichProgress prints readable lines
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    previous_handlers = {signum: signal.signal(signum, stopper.handle) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    if stopper.signum is not None:
        saved = checkpoints.latest_checkpoint(run_dir)
        raise QloraError(
            f"stopped by {signal.Signals(stopper.signum).name} at step {trainer.state.global_step}; checkpoint {saved}. "
            f"Continue with: {resume_command(run_dir, adapters_dir, processes=ranks.num_processes)}",
            exit_code=ExitCode(128 + stopper.signum),  # the shell's convention for a signal: 130 SIGINT, 143 SIGTERM
        )
    state = trainer.state
    final = final_train_loss(state.log_history)
    session_tokens = tally.session_tokens(state)
    metrics = {
        "train_loss": round(final[2] if final else result.training_loss, 4),  # at the end, where the curve ends
        "train_loss_steps": list(final[:2]) if final else [result.global_step] * 2,  # the steps it averages
        "mean_train_loss": round(result.training_loss, 4),  # the trainer's average over this session's steps
        "steps": result.global_step,
        "examples": len(data.train),
        "dropped_examples": data.dropped,
        "train_seconds": round(result.metrics["train_runtime"], 1),
        "tokens_seen": int(state.num_input_tokens_seen),
        # This session's tokens over this session's time: a resumed run restored the earlier tokens.
        "tokens_per_second": round(session_tokens / max(result.metrics["train_runtime"], 1e-9), 1),
        "peak_memory": peak_memory(),
    }
    if resume_from is not None:
        metrics["resumed_at_step"] = checkpoints.checkpoint_step(resume_from)
        metrics["session_tokens"] = int(session_tokens)
    if data.eval is not None:
        metrics["eval_loss"] = round(final_eval_loss(trainer), 4)
        log.info("eval loss at step %d: %.4f", state.global_step, metrics["eval_loss"])
    if not all(math.isfinite(value) for value in (metrics["train_loss"], metrics.get("eval_loss", 0.0))):
        raise QloraError(
            f"training diverged (loss {metrics['train_loss']}); no adapter written. Lower train.lr and retry",
            exit_code=ExitCode.DIVERGED,
        )
    adapter_state = gathered_adapter_state(trainer.model_wrapped)  # every rank takes part in the gather
    if not ranks.is_main_process:
        return None
    checkpoints.discard_staging(run_dir)  # other ranks' late writes into the last checkpoint's staging folder
    (run_dir / checkpoints.METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
    (run_dir / checkpoints.LOG_HISTORY).write_text(json.dumps(state.log_history, indent=1) + "\n")
    try:
        export_adapter(
            trainer.accelerator.unwrap_model(trainer.model),
            tokenizer,
            recipe,
            base_record,
            metrics,
            adapter_dir,
            force=force,
            state_dict=adapter_state,
            source=source,
            style=data.style,
            data_format=checked.train.format if checked.train else None,
            initial_adapter=run_dir / INITIAL_ADAPTER if recipe.lora.init in BASE_REWRITING else None,
            parent=parent.name if parent else None,
        )
    except OSError as error:
        raise QloraError(
            f"cannot write adapter {adapter_dir}: {error.strerror or error}; nothing was left behind"
        ) from None
    trainable, total = model.get_nb_trainable_parameters()
    curve = plot_curves(trainer.state.log_history, run_dir / "loss.png")
    report = write_report(
        run_dir, recipe=recipe, metrics=metrics, trainable=trainable, total=total, adapter_dir=adapter_dir, curve=curve
    )
    return Trained(name=recipe.lora.name, adapter=adapter_dir, run_dir=run_dir, report=report, metrics=metrics)


def final_eval_loss(trainer: SFTTrainer) -> float:
    """Eval loss at the last step: the one train.eval_steps logged there, else a fresh evaluation."""
    step = trainer.state.global_step
    logged = [
        entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry and entry["step"] == step
    ]
    return logged[-1] if logged else trainer.evaluate()["eval_loss"]


def check_sharding(recipe: Recipe) -> None:
    """FSDP and ZeRO-3 shard parameters of one dtype: the packed 4-bit weights must be stored in it. What is
    not carried through a sharded launch yet is refused here, before any work."""
    section = recipe.model
    if not sharded_launch():
        return
    if section.load_in_4bit and section.quant_storage != section.compute_dtype:
        raise QloraError(
            f"model.quant_storage: {section.quant_storage} under FSDP/DeepSpeed ZeRO-3, which shard parameters of one "
            f"dtype; add --set model.quant_storage={section.compute_dtype} (the packed 4-bit weights are the same size)"
        )
    if recipe.lora.init in BASE_REWRITING:
        raise QloraError(
            f"lora.init: {recipe.lora.init} under FSDP/DeepSpeed ZeRO-3: its export converts the adapter against "
            "the initial one, which the sharded gather does not do yet; train it on one GPU"
        )
    if recipe.lora.init_from is not None:
        raise QloraError(
            "lora.init_from under FSDP/DeepSpeed ZeRO-3: a continued adapter is not yet kept in the one dtype "
            "sharding needs; continue it on one GPU"
        )


def trained(name: str) -> bool:
    """A parameter of the trained adapter ("default"): not the base, not TRL's frozen DPO reference ("ref")."""
    return "lora_" in name and ".default." in name


INITIAL_ADAPTER = "initial-adapter"  # in the run folder: a PiSSA/OLoRA adapter as initialised, before training


def save_initial_adapter(model, folder: Path) -> None:
    """Written beside and renamed into place: a crash never leaves half an initial adapter to convert with."""
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def gathered_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The adapter's tensors, whole, when FSDP or ZeRO-3 has sharded them (None otherwise).

    Every rank must call this: the gather is collective. Without it the main process would save its own
    shard of each lora_A/lora_B, an adapter of zero-sized or partial tensors. Only the trainable tensors
    are kept; the main process briefly holds the whole 4-bit model (in CPU memory when training on GPUs)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if any(isinstance(module, FSDP) for module in model.modules()):
        # Offloading is for GPU memory; on CPU ranks (gloo) torch's offload path breaks on the 4-bit units.
        on_gpu = next(model.parameters()).device.type == "cuda"
        with FSDP.summon_full_params(model, writeback=False, rank0_only=True, offload_to_cpu=on_gpu):
            return {name: param.detach().cpu().clone() for name, param in model.named_parameters() if trained(name)}
    if zero3_launch():
        import deepspeed

        named = [(name, param) for name, param in model.named_parameters() if trained(name)]
        with deepspeed.zero.GatheredParameters([param for _, param in named], modifier_rank=None):
            return {name: param.detach().cpu().clone() for name, param in named}
    return None


def export_adapter(
    model,
    tokenizer,
    recipe: Recipe,
    base_record: dict,
    metrics: dict,
    dest: Path,
    *,
    force: bool,
    state_dict: dict | None = None,
    source: Path | None = None,
    style: Style | None = None,
    data_format: str | None = None,
    initial_adapter: Path | None = None,
    parent: str | None = None,
) -> None:
    """The self-describing adapter directory, visible only once complete. `state_dict` holds the
    gathered adapter tensors of a sharded run (gathered_adapter_state); `source` is the recipe file;
    `initial_adapter`, the adapter as PiSSA or OLoRA initialised it, turns the export into plain LoRA."""
    with atomic_directory(dest, force=force) as staging:
        # Given a state dict, peft does not call model.state_dict(), which under FSDP is a collective that
        # the other ranks would never join.
        conversion = {}
        if initial_adapter is not None:
            # peft writes (trained - initial) as a rank-2r adapter that loads on the unmodified base; it
            # rewrites the initial folder's config on the way, so it works on a copy.
            # The folder's name becomes a peft adapter name, which cannot hold a dot.
            scratch = Path(tempfile.mkdtemp(prefix="qlora-")) / "initial_adapter"
            shutil.copytree(initial_adapter, scratch)
            conversion = {"path_initial_model_for_weight_conversion": str(scratch)}
        try:
            # Only the trained adapter: under DPO the model also holds TRL's frozen reference copy ("ref").
            model.save_pretrained(
                staging, safe_serialization=True, state_dict=state_dict, selected_adapters=["default"], **conversion
            )
        finally:
            if conversion:
                shutil.rmtree(Path(conversion["path_initial_model_for_weight_conversion"]).parent, ignore_errors=True)
        if state_dict is not None:
            # peft finds adapter tensors by module path, and inside FSDP those paths carry wrapper names that
            # the gathered (clean) keys do not: write the file as peft lays it out, adapter slot name removed.
            from safetensors.torch import save_file

            tensors = {name.replace(".default.", "."): tensor.contiguous() for name, tensor in state_dict.items()}
            save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
        style = style or Style()
        if style.is_chat:  # serving the adapter's tokenizer (vLLM, a merged model) then renders as training did
            tokenizer.chat_template = style.template_text
        tokenizer.save_pretrained(staging)
        (staging / "recipe.yaml").write_text(recipe.to_yaml())
        adapters.AdapterRecord(
            folder=staging,
            name=recipe.lora.name,
            recipe_file=str(source.resolve()) if source else None,
            base=adapters.BaseRecord(**base_record),
            template=style.template,
            template_text=style.template_text,
            template_sha256=style.template_sha256,
            system=style.system,
            end_of_turn=Renderer(style, tokenizer).end_of_turn_tokens(),
            format=data_format,
            task=style.task,
            lora=adapters.LoraRecord(
                r=recipe.lora.r,
                alpha=recipe.lora.alpha,
                target_modules=recipe.lora.target_modules,
                use_dora=recipe.lora.use_dora,
                use_rslora=recipe.lora.use_rslora,
                lora_plus_ratio=recipe.lora.lora_plus_ratio,
                init=recipe.lora.init,
            ),
            method=recipe.train.method,
            parent=parent,
            data=adapters.DataRecord(path=recipe.data.path, examples=metrics["examples"], columns=recipe.data.columns),
            metrics=metrics,
        ).write()


def _start_run_dir(run_dir: Path, recipe: Recipe, *, force: bool, source: Path | None = None) -> None:
    refuse_dangerous_output(run_dir, "train.output_dir")
    if run_dir.exists() and force:
        shutil.rmtree(run_dir)  # check_new_output allowed this only because qlora made it
    run_dir.mkdir(parents=True, exist_ok=True)
    recipe_file = str(source.resolve()) if source else None
    checkpoints.RunMarker(adapter=recipe.lora.name, recipe_file=recipe_file).write(run_dir)
    (run_dir / checkpoints.RECIPE).write_text(recipe.to_yaml())


@dataclass(frozen=True)
class EpochSize:
    """One epoch of the training data, counted from the tokenized examples."""

    examples: int
    tokens: int
    steps: int  # optimizer steps

    @classmethod
    def count(cls, data: Dataset, recipe: Recipe, processes: int = 1) -> EpochSize:
        """As the trainer will see it: packed by TRL's own best-fit decreasing when train.packing is on (rows
        fill less than it seems: two 90-token examples never share a 160-token row), in micro-batches per
        process, rounded up to whole optimizer steps."""
        train = recipe.train
        rows = len(data)
        if "prompt_ids" in data.column_names:  # preference pairs: the prompt runs twice, once per answer
            tokens = sum(
                2 * len(prompt) + len(chosen) + len(rejected)
                for prompt, chosen, rejected in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])
            )
        else:
            tokens = sum(len(ids) for ids in data["input_ids"])
            if train.packing:
                from trl.data_utils import pack_dataset

                datasets.disable_progress_bars()  # a quick pass; the tokenizing bar was shown
                rows = len(pack_dataset(data.select_columns(["input_ids"]), recipe.data.max_length, strategy="bfd"))
        micro_batches = math.ceil(math.ceil(rows / processes) / train.batch_size)
        steps = max(math.ceil(micro_batches / train.grad_accum), 1)
        return cls(examples=len(data), tokens=tokens, steps=steps)


def show_dry_run(
    recipe: Recipe,
    skeleton,
    tokenizer,
    data: TrainingData,
    *,
    adapter_dir: Path,
    processes: int = 1,
) -> None:
    """Everything worth checking before spending GPU hours, from config files alone."""
    console.rule("resolved recipe")
    console.print(recipe.to_yaml(), markup=False, highlight=False)
    if "prompt_ids" in data.train.column_names:
        show_pair(tokenizer, data.train[0])
    else:
        show_example(tokenizer, data)
    console.rule("adapter")
    if recipe.lora.init_from is not None:
        console.print(f"continues {recipe.lora.init_from} (lora.init_from)", markup=False, highlight=False)
    else:
        from peft import get_peft_model

        trainable, total = get_peft_model(skeleton, lora_config(recipe.lora)).get_nb_trainable_parameters()
        console.print(
            f"trainable {human_count(trainable)} of {human_count(total)} parameters ({100 * trainable / total:.2f}%)"
        )
    console.rule("one epoch")
    epoch = EpochSize.count(data.train, recipe, processes)
    batch = f"{recipe.train.batch_size} x {recipe.train.grad_accum}" + (f" x {processes} GPUs" if processes > 1 else "")
    console.print(
        f"{epoch.examples:,} training examples ({data.dropped} dropped), {epoch.tokens:,} tokens: "
        f"{epoch.steps:,} optimizer steps per epoch at batch {batch}"
        + (" (packed)" if recipe.train.packing and recipe.train.method == "sft" else ""),
        highlight=False,
    )
    console.print(_epoch_time(recipe, skeleton.config.to_dict(), epoch), highlight=False)
    console.rule("where it goes")
    try:
        device = f"runs on {check_device(recipe.model).type}"
    except QloraError as no_device:
        device = f"cannot run here: {no_device}"
    console.print(
        f"run folder {recipe.train.output_dir}; adapter {adapter_dir}; {device}", markup=False, highlight=False
    )
    console.print("dry run: nothing was trained or written", highlight=False)


def show_example(tokenizer, data: TrainingData) -> None:
    """The training example with the most learned turns, its loss mask, and each turn's end checked."""
    example = shown_example(data.train)
    turns = learned_segments(example["labels"])
    kind = "multi-turn " if len(turns) > 1 else ""
    console.rule(f"a {kind}training example (dim: context, no loss; green: learned)")
    console.print(loss_mask_text(tokenizer, example["input_ids"], example["labels"]))
    learned = sum(1 for label in example["labels"] if label != IGNORE_INDEX)
    stop_ids = Renderer(data.style, tokenizer).stop_ids()
    ended = sum(1 for _, end in turns if example["labels"][end] in stop_ids)
    stops = " or ".join(tokenizer.convert_ids_to_tokens(stop_ids))
    what = "EOS" if stop_ids == [tokenizer.eos_token_id] else "end of turn"
    console.print(
        f"loss on {learned} of {len(example['input_ids'])} tokens in {len(turns)} learned span(s); "
        + (
            f"{what} ({stops}) is a label"
            if ended == len(turns) == 1
            else f"{ended} of {len(turns)} end with a learned {what} ({stops})"
        ),
        markup=False,
        highlight=False,
    )


def show_pair(tokenizer, pair: dict) -> None:
    """The first preference pair: the prompt (dim), the chosen answer (green) and the rejected one (red)."""
    console.rule("a preference pair (dim: prompt; green: chosen; red: rejected)")
    console.print(Text(tokenizer.decode(pair["prompt_ids"]), style="dim"))
    console.print(Text(tokenizer.decode(pair["chosen_ids"]), style="green"))
    console.print(Text(tokenizer.decode(pair["rejected_ids"]), style="red"))
    console.print(
        f"prompt {len(pair['prompt_ids'])} tokens; chosen {len(pair['chosen_ids'])}, rejected {len(pair['rejected_ids'])}",
        markup=False,
        highlight=False,
    )


def _epoch_time(recipe: Recipe, config: dict, epoch: EpochSize) -> str:
    from qlora_cli import plan

    gpu, _, chosen = plan.choose_gpu(None)
    seconds = epoch.tokens / plan.assumed_throughput(config, recipe, gpu)
    return (
        f"time per epoch on a GPU: ~{plan.duration(seconds)} on {chosen}, by assumed throughput; "
        f"`qlora plan` with --dataset-tokens {epoch.tokens} --gpu NAME times it for your card"
    )


def learned_segments(labels: list[int]) -> list[tuple[int, int]]:
    """(first, last) index of each run of learned tokens: one per trained turn."""
    runs: list[tuple[int, int]] = []
    for index, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if runs and runs[-1][1] == index - 1:
            runs[-1] = (runs[-1][0], index)
        else:
            runs.append((index, index))
    return runs


def shown_example(dataset: Dataset, looked_at: int = 200) -> dict:
    """The example a dry run shows: among the first `looked_at`, the first with the most learned turns, so
    that a multi-turn mask is seen when the data has one."""
    turns = [len(learned_segments(dataset[index]["labels"])) for index in range(min(len(dataset), looked_at))]
    return dataset[turns.index(max(turns))]


def loss_mask_text(tokenizer, input_ids: list[int], labels: list[int]) -> Text:
    """The example as it reads, each token styled by its label. Tokens are decoded after the ones before
    them: decoded alone a SentencePiece token loses its leading space, and a byte-level BPE token may hold
    only part of a character."""
    text = Text()
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    start = shown_until = 0  # decode(input_ids[start:shown_until]) is already on screen
    for index, (token_id, label) in enumerate(zip(input_ids, labels)):
        style = "dim" if label == IGNORE_INDEX else "bold green"
        if token_id in special:
            text.append(tokenizer.convert_ids_to_tokens(token_id), style=style)
            start = shown_until = index + 1
            continue
        shown = tokenizer.decode(input_ids[start:shown_until])
        now = tokenizer.decode(input_ids[start : index + 1])
        if now.endswith("\ufffd"):  # an unfinished UTF-8 character: shown with the token that completes it
            continue
        text.append(now[len(shown) :], style=style)
        start, shown_until = shown_until, index + 1
    return text
