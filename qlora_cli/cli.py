"""Command line: parse, load the recipe, call one run(), turn user errors into exit code 1.

No ML code here, and nothing heavy at import time: torch and friends are imported inside the
commands that need them, so `qlora --help` and `qlora validate` answer at once.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import typer

from qlora_cli.errors import QloraError

app = typer.Typer(
    help="Fine-tune large language models with QLoRA: 4-bit base, small LoRA adapters.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
log = logging.getLogger("qlora_cli")

RecipeArg = typer.Argument(..., help="Recipe YAML file, e.g. recipes/tiny-sql.yaml.", show_default=False)
SetOpt = typer.Option([], "--set", help="Override one recipe key: --set lora.r=16 (repeatable).")
AdaptersDirOpt = typer.Option(
    None, "--adapters-dir", help="Adapters home (default: $QLORA_ADAPTERS_DIR or ./adapters)."
)


def _quiet_libraries() -> None:
    """The libraries underneath talk a lot; their warnings are rarely our user's problem."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for category in (FutureWarning, DeprecationWarning, UserWarning):
        warnings.filterwarnings("ignore", category=category)
    for noisy in (
        "bitsandbytes",
        "datasets",
        "accelerate",
        "peft",
        "trl",
        "transformers",
        "httpx",
        "huggingface_hub",
        "matplotlib",
    ):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@app.callback()
def _setup(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logs and library warnings."),
) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, show_time=False, markup=False, console=_stderr())
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler], force=True
    )
    if not verbose:
        _quiet_libraries()


def _stderr():
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)


@app.command()
def validate(recipe: str = RecipeArg, overrides: list[str] = SetOpt) -> None:
    """Check a recipe without loading any weights."""
    from qlora_cli.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    typer.echo(f"{recipe}: OK (adapter {loaded.lora.name!r}, model {loaded.model.id})")


@app.command()
def train(
    recipe: str = RecipeArg,
    overrides: list[str] = SetOpt,
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Show the resolved recipe, one example with its loss mask and the parameter count; train nothing.",
    ),
    force: bool = typer.Option(
        False,
        "--force",
        help="Replace an existing adapter and run folder made by qlora (with --resume: accept a changed recipe).",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run from its newest complete checkpoint."
    ),
    adapters_dir: str | None = AdaptersDirOpt,
) -> None:
    """Fine-tune a LoRA adapter on a 4-bit base, as the recipe says."""
    from qlora_cli.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    from qlora_cli import train as train_stage

    train_stage.run(loaded, adapters_dir=adapters_dir, force=force, resume=resume, dry_run=dry_run)


@app.command()
def doctor(recipe: str | None = typer.Argument(None, help="Also check disk room for this recipe's model.")) -> None:
    """Check Python, torch and CUDA, the GPU, bitsandbytes, disk and the hub, before downloading anything."""
    from qlora_cli import doctor as doctor_stage
    from qlora_cli.recipe import load_recipe

    checks = doctor_stage.run(load_recipe(recipe) if recipe else None)
    marks = {True: ("OK  ", "green"), None: ("WARN", "yellow"), False: ("FAIL", "red")}
    for check in checks:
        mark, color = marks[check.ok]
        typer.echo(typer.style(mark, fg=color) + f" {check.name:<13} {check.detail}")
    if any(check.ok is False for check in checks):
        raise typer.Exit(1)


@app.command()
def plan(
    recipe: str = RecipeArg,
    overrides: list[str] = SetOpt,
    gpu_memory: float | None = typer.Option(None, "--gpu-memory", help="GPU memory to fit in, GB (e.g. 24)."),
    tokens_per_second: float | None = typer.Option(
        None, "--tokens-per-second", help="Measured training throughput, for the epoch time."
    ),
    dataset_tokens: int | None = typer.Option(
        None, "--dataset-tokens", help="Tokens in one epoch of the data, for the epoch time."
    ),
) -> None:
    """Predict peak GPU memory and time per epoch from the model's config alone (no torch, no weights)."""
    from rich.console import Console

    from qlora_cli import plan as plan_stage
    from qlora_cli.recipe import load_recipe

    result = plan_stage.run(
        load_recipe(recipe, overrides),
        gpu_memory_gb=gpu_memory,
        tokens_per_second=tokens_per_second,
        dataset_tokens=dataset_tokens,
    )
    Console().print(plan_stage.render(result))
    if result.fits is False:
        raise typer.Exit(2)


@app.command()
def generate(
    prompt: str | None = typer.Argument(None, help="The instruction to answer (omit with --prompts or --chat)."),
    input_text: str = typer.Option("", "--input", help="Optional context for the instruction (alpaca's input field)."),
    adapter: list[str] = typer.Option(
        [], "--adapter", "-a", help="Adapter name or folder; repeat for several; 'none' is the base alone."
    ),
    mix: str | None = typer.Option(None, "--mix", help="Weighted combination, e.g. sql=0.7,json=0.3."),
    compare: bool = typer.Option(False, "--compare", help="Answer with the base and every adapter, side by side."),
    prompts: Path | None = typer.Option(
        None, "--prompts", help="JSONL of {instruction, input?, adapter?} rows: batch mode."
    ),
    out: Path | None = typer.Option(None, "--out", help="Batch mode: write JSONL results here (default: stdout)."),
    chat: bool = typer.Option(False, "--chat", help="Interactive: type instructions, read answers; empty line quits."),
    max_new_tokens: int = typer.Option(128, min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 is greedy decoding."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int = typer.Option(0),
    base: str | None = typer.Option(
        None, "--base", help="Base model id or folder (default: the one the adapter recorded)."
    ),
    allow_base_mismatch: bool = typer.Option(
        False, "--allow-base-mismatch", help="Load adapters on a base whose weights differ from the recorded one."
    ),
    adapters_dir: str | None = AdaptersDirOpt,
) -> None:
    """Generate with one adapter, several, a weighted mix, or none."""
    if sum(bool(mode) for mode in (prompt, prompts, chat)) != 1:
        raise QloraError("give exactly one of: a PROMPT argument, --prompts FILE, or --chat")
    if not adapter and not mix:
        raise QloraError(
            "name an adapter with --adapter NAME (or --adapter none for the base alone); `qlora adapters list` shows them"
        )
    from qlora_cli.generate import BASE, MIX, Sampling, open_session, parse_mix, read_prompts

    weights = parse_mix(mix) if mix else None
    rows = read_prompts(prompts) if prompts else None
    session = open_session(adapter, mix=weights, base=base, home=adapters_dir, allow_base_mismatch=allow_base_mismatch)
    targets = [MIX] if weights else [name for name in dict.fromkeys(adapter)]
    targets = [name if name == BASE else session.names[session.names.index(Path(name).name)] for name in targets]
    if compare:
        targets = [BASE, *[name for name in targets if name != BASE]]
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if rows is not None:
        _generate_batch(session, rows, targets, sampling, out)
        return
    while True:
        instruction = prompt if not chat else typer.prompt("you", default="", show_default=False)
        if not instruction.strip():
            return
        for name in targets:
            if len(targets) > 1:
                typer.secho(f"── {name} ──", fg="cyan", err=False)
            for piece in session.stream({"instruction": instruction, "input": input_text}, name, sampling):
                typer.echo(piece, nl=False)
            typer.echo()
        if not chat:
            return


def _generate_batch(session, rows: list[dict], targets: list[str], sampling, out: Path | None) -> None:
    import json

    results = []
    for name in targets:
        chosen = [row for row in rows if row.get("adapter", name) == name]
        for row, answer in zip(chosen, session.ask(chosen, name, sampling)):
            results.append({**row, "adapter": name, "output": answer})
    lines = "".join(json.dumps(result, ensure_ascii=False) + "\n" for result in results)
    if out is None:
        typer.echo(lines, nl=False)
    else:
        out.write_text(lines)
        log.info("%d answers written to %s", len(results), out)


@app.command()
def merge(
    adapter: str = typer.Option(..., "--adapter", "-a", help="Adapter name or folder to merge."),
    out: Path = typer.Option(
        ..., "--out", help="Folder for the standalone merged model (must not exist unless --force)."
    ),
    source: str = typer.Option(
        "nf4",
        "--from",
        help="'nf4': merge into the dequantized 4-bit weights the adapter was trained on; 'original': into the 16-bit weights.",
    ),
    dtype: str | None = typer.Option(
        None, "--dtype", help="Output dtype: bfloat16, float16 or float32 (default: the recipe's compute dtype)."
    ),
    base: str | None = typer.Option(
        None, "--base", help="Base model id or folder (default: the one the adapter recorded)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing merged model made by qlora."),
    allow_base_mismatch: bool = typer.Option(
        False, "--allow-base-mismatch", help="Merge into a base whose weights differ from the recorded one."
    ),
    verify: bool = typer.Option(
        True, "--verify/--no-verify", help="Compare the merged model's logits with base+adapter before finishing."
    ),
    tolerance: float | None = typer.Option(
        None, "--tolerance", help="Largest logit difference allowed, relative to the largest logit (default by dtype)."
    ),
    adapters_dir: str | None = AdaptersDirOpt,
) -> None:
    """Merge an adapter into its base: one standalone model, streamed shard by shard, verified."""
    if source not in ("nf4", "original"):
        raise QloraError(f"--from {source!r}: use nf4 or original")
    from qlora_cli import merge as merge_stage

    summary = merge_stage.run(
        adapter,
        out,
        source=source,
        dtype=dtype,
        base=base,
        home=adapters_dir,
        force=force,
        allow_base_mismatch=allow_base_mismatch,
        verify=verify,
        tolerance=tolerance,
    )
    verified = (
        f"NOT verified: {summary['unverified_reason']}"
        if not summary["verified"]
        else (
            f"largest logit difference {summary['max_logit_diff']:.2e} ({100 * summary['relative_logit_diff']:.2f}% of the largest logit)"
        )
    )
    typer.echo(
        f"merged {adapter} into {summary['merged']} ({summary['source']} base, {summary['dtype']}, {summary['shards']} shard(s)); {verified}"
    )


@app.command(name="eval")
def evaluate(
    data: str = typer.Option(..., "--data", help="Held-out rows: a .jsonl/.json/.csv/.parquet file or a hub dataset."),
    adapter: list[str] = typer.Option(
        [], "--adapter", "-a", help="Adapter name or folder; repeat; 'none' is the base."
    ),
    mix: str | None = typer.Option(None, "--mix", help="Also evaluate a weighted combination, e.g. sql=0.5,json=0.5."),
    max_rows: int | None = typer.Option(None, "--max-rows", min=1),
    sql: bool = typer.Option(
        False, "--sql", help="Also run generated and reference SQL on an in-memory SQLite database and compare results."
    ),
    out: Path | None = typer.Option(None, "--out", help="Write the results as JSON too."),
    base: str | None = typer.Option(
        None, "--base", help="Base model id or folder (default: the adapters' recorded base)."
    ),
    adapters_dir: str | None = AdaptersDirOpt,
) -> None:
    """Loss, perplexity and exact match of the base and adapters, side by side."""
    if not adapter and not mix:
        raise QloraError("name what to evaluate: --adapter none --adapter sql ... or --mix sql=0.5,json=0.5")
    from rich.console import Console
    from rich.table import Table

    from qlora_cli import evaluate as evaluate_stage
    from qlora_cli.generate import MIX, open_session, parse_mix
    from qlora_cli.recipe import local_or_hub

    resolved_data = local_or_hub(data, Path.cwd())  # a file relative to here, or a hub dataset id
    if resolved_data is None:
        raise QloraError(f"--data: file not found: {data}")
    weights = parse_mix(mix) if mix else None
    session = open_session(adapter, mix=weights, base=base, home=adapters_dir)
    names = [name if name == "none" else Path(name).name for name in adapter] + ([MIX] if mix else [])
    results = evaluate_stage.run(session, resolved_data, names, sql=sql, max_rows=max_rows, out=out)
    table = Table(title=f"{data} on {session.base_id}")
    for column in ("adapter", "examples", "loss", "perplexity", "exact match", *(["execution match"] if sql else [])):
        table.add_column(column, justify="left" if column == "adapter" else "right")
    for result in results:
        label = f"mix {mix}" if mix and result["adapter"] == MIX else result["adapter"]
        cells = [
            label,
            str(result["examples"]),
            f"{result['loss']:.3f}",
            f"{result['perplexity']:.2f}",
            f"{100 * result['exact_match']:.1f}%",
        ]
        if sql:
            cells.append(f"{100 * result['execution_match']:.1f}%")
        table.add_row(*cells)
    Console().print(table)


recipes_app = typer.Typer(help="The recipes that ship with qlora: starting points for your own.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("list")
def recipes_list() -> None:
    """Shipped recipes with their model, dataset and purpose."""
    from rich.console import Console
    from rich.table import Table

    from qlora_cli.recipe import SHIPPED_RECIPES, describe_recipe

    rows = [describe_recipe(path) for path in sorted(SHIPPED_RECIPES.glob("*.yaml"))]
    table = Table(title=f"recipes in {SHIPPED_RECIPES}")
    table.add_column("name", no_wrap=True, min_width=max(len(row["name"]) for row in rows))  # what users type next
    for column in ("model", "data", "purpose"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    Console().print(table)


@recipes_app.command("show")
def recipes_show(name: str = typer.Argument(..., help="Recipe name, e.g. mistral7b-alpaca.")) -> None:
    """Print a shipped recipe."""
    from qlora_cli.recipe import shipped_recipe

    typer.echo(shipped_recipe(name).read_text(), nl=False)


@recipes_app.command("copy")
def recipes_copy(
    name: str = typer.Argument(..., help="Recipe name, e.g. mistral7b-alpaca."),
    dest: Path = typer.Argument(..., help="New recipe file (or a folder to copy into)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    """Copy a shipped recipe to start your own."""
    from qlora_cli.recipe import copy_recipe

    written = copy_recipe(name, dest, force=force)
    typer.echo(f"wrote {written}; edit it, then: qlora validate {written}")


adapters_app = typer.Typer(help="Find and inspect trained adapters.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")


@adapters_app.command("list")
def adapters_list(adapters_dir: str | None = AdaptersDirOpt) -> None:
    """Every adapter in the adapters home, with its base, rank, data and metrics."""
    from rich.console import Console
    from rich.table import Table

    from qlora_cli import adapters

    found = adapters.list_adapter_dirs(adapters_dir)
    if not found:
        typer.echo(f"no adapters in {adapters.adapters_home(adapters_dir)} (qlora train writes them there)")
        return
    table = Table(title=f"adapters in {adapters.adapters_home(adapters_dir)}")
    for column in ("name", "base", "r", "targets", "data", "train loss", "eval loss", "size", "created"):
        # The columns people act on stay whole; the rest wrap in narrow terminals.
        table.add_column(column, no_wrap=column in ("name", "targets", "r", "size"))
    for folder in found:
        meta = adapters.read_metadata(folder)
        lora, metrics = meta.get("lora", {}), meta.get("metrics", {})
        targets = lora.get("target_modules", "?")
        base = str(meta.get("base", {}).get("id", "?"))
        table.add_row(
            folder.name,
            Path(base).name if Path(base).is_absolute() else base,
            str(lora.get("r", "?")),
            targets if isinstance(targets, str) else ",".join(targets),
            Path(str(meta.get("data", {}).get("path", "?"))).name,
            str(metrics.get("train_loss", "-")),
            str(metrics.get("eval_loss", "-")),
            f"{adapters.directory_size(folder) / 2**20:.1f} MiB",
            str(meta.get("created", "?"))[:16].replace("T", " "),
        )
    Console().print(table)


@adapters_app.command("show")
def adapters_show(
    name: str = typer.Argument(..., help="Adapter name or folder."), adapters_dir: str | None = AdaptersDirOpt
) -> None:
    """One adapter's record and the recipe that made it."""
    import json

    from qlora_cli import adapters

    folder = adapters.find_adapter(name, adapters_dir)
    typer.echo(f"# {folder}")
    typer.echo(json.dumps(adapters.read_metadata(folder), indent=2))
    recipe = folder / "recipe.yaml"
    if recipe.is_file():
        typer.echo("\n# recipe.yaml")
        typer.echo(recipe.read_text())


def main() -> None:
    try:
        app()
    except QloraError as error:
        from rich.text import Text

        _stderr().print(Text.assemble(("error: ", "bold red"), str(error)), highlight=False)
        sys.exit(getattr(error, "exit_code", 1))
    except KeyboardInterrupt:
        sys.exit(130)
