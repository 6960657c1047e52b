"""Command line: parse, call one run(), render its result, turn user errors into exit codes.

No ML code here, and nothing heavy at import time: torch and friends are imported inside the
commands that need them, so `qlora --help` and `qlora validate` answer at once.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import Annotated

import typer

from qlora_cli.errors import ExitCode, QloraError

app = typer.Typer(
    help="Fine-tune large language models with QLoRA: 4-bit base, small LoRA adapters.",
    epilog=(
        "Start here:\n"
        "  qlora doctor\n"
        "  qlora recipes list\n"
        "  qlora train tiny-sql\n"
        "  qlora generate --adapter sql 'How many users are there?'"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
log = logging.getLogger("qlora_cli")

RecipeArg = Annotated[str, typer.Argument(help="Recipe YAML file, e.g. recipes/tiny-sql.yaml.", show_default=False)]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override one recipe key: --set lora.r=16 (repeatable).")
]
AdaptersDirOpt = Annotated[
    str | None, typer.Option("--adapters-dir", help="Adapters home (default: $QLORA_ADAPTERS_DIR or ./adapters).")
]
BaseOpt = Annotated[
    str | None, typer.Option("--base", help="Base model id or folder (default: the one the adapter recorded).")
]


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


VERBOSE_FLAGS = ("-v", "--verbose")


def _show_version(asked: bool) -> None:
    if asked:
        from qlora_cli.adapters import library_versions

        typer.echo(f"qlora {library_versions(('qlora-cli',))['qlora-cli']}")  # "not installed" in a bare checkout
        raise typer.Exit()


@app.callback()
def _setup(
    verbose: Annotated[
        bool,
        typer.Option(*VERBOSE_FLAGS, help="Show debug logs and library warnings (before or after the command)."),
    ] = False,
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print qlora's version and exit."),
    ] = False,
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


def _print(renderable) -> None:
    """A command's rendered result on stdout: tables fit the terminal, lines of text are never broken."""
    from rich.console import Console
    from rich.text import Text

    Console().print(renderable, soft_wrap=isinstance(renderable, Text))


@app.command()
def validate(recipe: RecipeArg, overrides: SetOpt = None, adapters_dir: AdaptersDirOpt = None) -> None:
    """Check a recipe without loading any weights: keys, data files and rows, columns, model and targets.

    Examples:
      qlora validate recipes/tiny-sql.yaml
      qlora validate my.yaml --set lora.r=32
    """
    from qlora_cli import preflight
    from qlora_cli.recipe import find_recipe, load_recipe

    loaded = load_recipe(recipe, overrides or [])
    typer.echo(preflight.render(preflight.run(loaded, find_recipe(recipe), adapters_dir=adapters_dir)))


@app.command()
def train(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Show the resolved recipe, one example with its loss mask and the parameter count; train nothing.",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an existing adapter and run folder made by qlora (with --resume: accept a changed recipe).",
        ),
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run from its newest complete checkpoint.")
    ] = False,
    adapters_dir: AdaptersDirOpt = None,
) -> None:
    """Fine-tune a LoRA adapter on a 4-bit base, as the recipe says.

    Examples:
      qlora train tiny-sql
      qlora train my.yaml --dry-run
      qlora train my.yaml --set train.epochs=2 --set lora.r=32
      qlora train my.yaml --resume
    """
    from qlora_cli.preflight import check_outputs
    from qlora_cli.recipe import find_recipe, load_recipe

    loaded = load_recipe(recipe, overrides or [])
    source = find_recipe(recipe)
    if not dry_run:  # a refusal in a second; train.run checks again, as every rank of a launch must
        check_outputs(loaded, adapters_dir=adapters_dir, force=force, resume=resume, source=source)
    from qlora_cli import train as train_stage

    trained = train_stage.run(
        loaded, adapters_dir=adapters_dir, force=force, resume=resume, dry_run=dry_run, source=source
    )
    if trained is not None:
        log.info(train_stage.render(trained))


@app.command()
def doctor(
    recipe: Annotated[
        str | None,
        typer.Argument(
            help="Also check this recipe: it loads, and the disk has room for its model.", show_default=False
        ),
    ] = None,
) -> None:
    """Check Python, torch and CUDA, the GPU, bitsandbytes, the hub and disk, before downloading anything.

    Every check prints one line, even when another fails; without network it answers within seconds.

    Exit codes: 0 every check passed or only warned (WARN: e.g. no GPU, or no hub); 1 a check failed (FAIL).

    Examples:
      qlora doctor
      qlora doctor recipes/mistral7b-alpaca.yaml
    """
    from qlora_cli import doctor as doctor_stage

    diagnosis = doctor_stage.run(recipe)
    _print(doctor_stage.render(diagnosis))
    raise typer.Exit(diagnosis.exit_code)


@app.command()
def plan(
    recipe: RecipeArg,
    overrides: SetOpt = None,
    gpu_memory: Annotated[
        float | None, typer.Option("--gpu-memory", help="GPU memory to fit in, GB (e.g. 24).")
    ] = None,
    tokens_per_second: Annotated[
        float | None, typer.Option("--tokens-per-second", help="Measured training throughput, for the epoch time.")
    ] = None,
    dataset_tokens: Annotated[
        int | None, typer.Option("--dataset-tokens", help="Tokens in one epoch of the data, for the epoch time.")
    ] = None,
    gpu: Annotated[
        str | None,
        typer.Option(
            "--gpu",
            help="The card to plan for: h200, h100, h100-pcie, a100-80gb, a100-40gb, l40s, a6000, rtx4090, rtx3090, "
            "a10, l4, t4 (default: the one nvidia-smi finds). Sets its memory and speed.",
        ),
    ] = None,
) -> None:
    """Predict peak GPU memory and time per epoch from the model's config alone (no torch, no weights).

    Examples:
      qlora plan recipes/mistral7b-alpaca.yaml --gpu-memory 24
      qlora plan recipes/qwen2.5-14b-sql.yaml --gpu rtx4090
    """
    from qlora_cli import plan as plan_stage
    from qlora_cli.recipe import load_recipe

    result = plan_stage.run(
        load_recipe(recipe, overrides or []),
        gpu_memory_gb=gpu_memory,
        tokens_per_second=tokens_per_second,
        dataset_tokens=dataset_tokens,
        gpu=gpu,
    )
    _print(plan_stage.render(result))
    if result.fits is False:
        raise typer.Exit(ExitCode.DOES_NOT_FIT)


@app.command()
def generate(
    prompt: Annotated[
        str | None, typer.Argument(help="The instruction to answer (omit with --prompts or --chat).")
    ] = None,
    input_text: Annotated[
        str, typer.Option("--input", help="Optional context for the instruction (alpaca's input field).")
    ] = "",
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", "-a", help="Adapter name or folder; repeat for several; 'none' is the base alone."),
    ] = None,
    mix: Annotated[str | None, typer.Option("--mix", help="Weighted combination, e.g. sql=0.7,json=0.3.")] = None,
    compare: Annotated[
        bool, typer.Option("--compare", help="Answer with the base and every adapter, side by side.")
    ] = False,
    prompts: Annotated[
        Path | None,
        typer.Option(
            "--prompts", help="JSONL of {instruction, input?} or {messages} rows, each with adapter?: batch mode."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Batch mode: write JSONL results here (default: stdout).")
    ] = None,
    chat: Annotated[
        bool,
        typer.Option("--chat", help="Interactive: type instructions, read answers; an empty line or Ctrl-D quits."),
    ] = False,
    system: Annotated[
        str | None,
        typer.Option("--system", help="System prompt for the conversation (adapters trained on a chat template)."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer, in tokens.")] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy decoding.")] = 0.0,
    top_p: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling: keep the likeliest tokens up to this mass.")
    ] = 1.0,
    seed: Annotated[int, typer.Option(help="Random seed for sampling (temperature > 0), for repeatable answers.")] = 0,
    base: BaseOpt = None,
    allow_base_mismatch: Annotated[
        bool,
        typer.Option(
            "--allow-base-mismatch", help="Load adapters on a base whose weights differ from the recorded one."
        ),
    ] = False,
    adapters_dir: AdaptersDirOpt = None,
) -> None:
    """Generate with one adapter, several, a weighted mix, or none.

    Examples:
      qlora generate --adapter sql "How many users signed up in 2024?"
      qlora generate --adapter sql --adapter none --compare "List all orders"
      qlora generate --mix sql=0.7,json=0.3 "Order two apples"
      qlora generate --adapter sql --prompts questions.jsonl --out answers.jsonl
      qlora generate --adapter sql --chat
      qlora generate --adapter orders --chat --system "You take orders for a cafe."
    """
    adapter = adapter or []
    if sum(bool(mode) for mode in (prompt, prompts, chat)) != 1:
        raise QloraError("give exactly one of: a PROMPT argument, --prompts FILE, or --chat")
    if not adapter and not mix:
        raise QloraError(
            "name an adapter with --adapter NAME (or --adapter none for the base alone); `qlora adapters list` shows them"
        )
    if out is not None and not prompts:
        raise QloraError("--out writes batch answers: use it with --prompts FILE")
    from qlora_cli import generate as generate_stage
    from qlora_cli.files import prepare_output_file

    rows = generate_stage.read_prompts(prompts) if prompts else None  # a bad file is named before any weights load
    if system is not None:
        records = generate_stage.load_records(
            adapter, mix=generate_stage.parse_mix(mix) if mix else None, home=adapters_dir
        )
        generate_stage.check_system({record.name: record.style for record in records.values()}, system)
    if out is not None:
        prepare_output_file(out, "--out", "answers.jsonl")
    session, targets = generate_stage.open_targets(
        adapter, mix=mix, compare=compare, base=base, home=adapters_dir, allow_base_mismatch=allow_base_mismatch
    )
    sampling = generate_stage.Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    if rows is not None:
        batch = generate_stage.run_batch(session, rows, targets, sampling, out)
        typer.echo(generate_stage.render_batch(batch), nl=False)
        return
    if chat:
        typer.secho(generate_stage.CHAT_HELP, err=True, dim=True)
    try:
        generate_stage.converse(
            session,
            targets,
            generate_stage.chat_instructions() if chat else [prompt],
            input_text,
            sampling,
            show=partial(typer.echo, nl=False),
            show_heading=partial(typer.secho, fg="cyan"),
            system=system,
        )
    except KeyboardInterrupt:
        if not chat:
            raise
        typer.echo()  # Ctrl-C during an answer ends the chat, as at the prompt: cleanly, exit 0


@app.command()
def merge(
    adapter: Annotated[str, typer.Option("--adapter", "-a", help="Adapter name or folder to merge.")],
    out: Annotated[
        Path, typer.Option("--out", help="Folder for the standalone merged model (must not exist unless --force).")
    ],
    source: Annotated[
        str,
        typer.Option(
            "--from",
            help="'nf4': merge into the dequantized 4-bit weights the adapter was trained on; 'original': into the 16-bit weights.",
        ),
    ] = "nf4",
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype", help="Output dtype: bfloat16, float16 or float32 (default: the recipe's compute dtype)."
        ),
    ] = None,
    base: BaseOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing merged model made by qlora.")] = False,
    allow_base_mismatch: Annotated[
        bool,
        typer.Option("--allow-base-mismatch", help="Merge into a base whose weights differ from the recorded one."),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify", help="Compare the merged model's logits with base+adapter before finishing."
        ),
    ] = True,
    tolerance: Annotated[
        float | None,
        typer.Option(
            "--tolerance",
            help="Largest logit difference allowed, relative to the largest logit (default by dtype).",
        ),
    ] = None,
    adapters_dir: AdaptersDirOpt = None,
) -> None:
    """Merge an adapter into its base: one standalone model, streamed shard by shard, verified.

    Examples:
      qlora merge --adapter sql --out merged/sql
      qlora merge --adapter sql --out merged/sql --from original --dtype float16
    """
    if source not in ("nf4", "original"):
        raise QloraError(f"--from {source!r}: use nf4 or original")
    from qlora_cli import merge as merge_stage

    merged = merge_stage.run(
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
    typer.echo(merge_stage.render(merged))


@app.command(name="eval")
def evaluate(
    data: Annotated[
        str, typer.Option("--data", help="Held-out rows: a .jsonl/.json/.csv/.parquet file or a hub dataset.")
    ],
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", "-a", help="Adapter name or folder; repeat; 'none' is the base."),
    ] = None,
    mix: Annotated[
        str | None, typer.Option("--mix", help="Also evaluate a weighted combination, e.g. sql=0.5,json=0.5.")
    ] = None,
    max_rows: Annotated[
        int | None, typer.Option("--max-rows", min=1, help="Evaluate only the first N rows (a quick look).")
    ] = None,
    sql: Annotated[
        bool,
        typer.Option(
            "--sql",
            help="Also run generated and reference SQL on an in-memory SQLite database and compare results.",
        ),
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="Write the totals and every row (input, reference, answer) as JSON.")
    ] = None,
    base: Annotated[
        str | None, typer.Option("--base", help="Base model id or folder (default: the adapters' recorded base).")
    ] = None,
    adapters_dir: AdaptersDirOpt = None,
) -> None:
    """Loss, perplexity and exact match of the base and adapters, side by side.

    Examples:
      qlora eval --data recipes/tiny/sql/test.jsonl --adapter none --adapter sql --sql
      qlora eval --data test.jsonl --adapter sql --max-rows 50 --out eval.json
    """
    adapter = adapter or []
    if not adapter and not mix:
        raise QloraError("name what to evaluate: --adapter none --adapter sql ... or --mix sql=0.5,json=0.5")
    from qlora_cli import evaluate as evaluate_stage

    evaluation = evaluate_stage.run(
        data, adapter, mix=mix, sql=sql, max_rows=max_rows, out=out, base=base, home=adapters_dir
    )
    _print(evaluate_stage.render(evaluation))


@app.command()
def serve(
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter", "-a", help="Adapter name or folder; repeat. Default: every adapter in the adapters home."
        ),
    ] = None,
    base: BaseOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 opens the server to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", envvar="QLORA_API_KEY", help="Key every request must send (Bearer); env QLORA_API_KEY."
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Requests generated together in one batch.")] = 16,
    queue: Annotated[int, typer.Option(min=1, help="Requests that may wait; beyond, 503.")] = 64,
    batching: Annotated[
        str,
        typer.Option(
            help="mixed: requests for different adapters share a batch; switch: one request at a time, switching adapters."
        ),
    ] = "mixed",
    max_body: Annotated[int, typer.Option(min=1024, help="Largest request body, in bytes; beyond, 413.")] = 1 << 20,
    print_vllm: Annotated[
        bool,
        typer.Option(
            "--print-vllm", help="Check the adapters for vLLM and SGLang and print the commands that serve them there."
        ),
    ] = False,
    adapters_dir: AdaptersDirOpt = None,
) -> None:
    """Serve the base and its adapters on an OpenAI-compatible endpoint: `model` picks the adapter.

    Examples:
      qlora serve                                   # every adapter in ./adapters, on 127.0.0.1:8000
      qlora serve -a sql -a json --port 8080 --api-key $KEY
      curl localhost:8000/v1/models
      qlora serve -a sql -a json --print-vllm        # the vllm serve / sglang commands, after checking the adapters
    """
    if print_vllm:
        from qlora_cli import scaleout

        checked = scaleout.handoff(adapter or [], adapters_dir)
        typer.echo(checked.render())
        if not checked.servable:
            raise typer.Exit(ExitCode.USER_ERROR)
        return
    if batching not in ("mixed", "switch"):
        raise QloraError(f"--batching {batching!r}: use mixed or switch")
    from qlora_cli import serve as serve_stage

    catalog = serve_stage.open_catalog(
        adapter or [], base=base, home=adapters_dir, max_batch=max_batch, queue_size=queue, mixed=batching == "mixed"
    )
    served = serve_stage.run(catalog, host=host, port=port, api_key=api_key, max_body=max_body)
    typer.echo(served.render(), err=True)


recipes_app = typer.Typer(help="The recipes that ship with qlora: starting points for your own.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
RecipeNameArg = Annotated[str, typer.Argument(help="Recipe name, e.g. mistral7b-alpaca.")]


@recipes_app.command("list")
def recipes_list() -> None:
    """Shipped recipes with their model and purpose.

    Example:
      qlora recipes list
    """
    from qlora_cli.recipe import list_recipes, render_recipes

    _print(render_recipes(list_recipes()))


@recipes_app.command("keys")
def recipes_keys(
    section: Annotated[
        str | None,
        typer.Argument(help="Only this section: model, lora, data or train.", show_default=False),
    ] = None,
) -> None:
    """Every recipe key with its default and what it does, from the schema itself.

    Examples:
      qlora recipes keys
      qlora recipes keys lora
    """
    from qlora_cli.recipe import recipe_keys, render_recipe_keys

    _print(render_recipe_keys(recipe_keys(section)))


@recipes_app.command("show")
def recipes_show(name: RecipeNameArg) -> None:
    """Print a shipped recipe.

    Example:
      qlora recipes show tiny-sql
    """
    from qlora_cli.recipe import shipped_recipe

    typer.echo(shipped_recipe(name).read_text(), nl=False)


@recipes_app.command("copy")
def recipes_copy(
    name: RecipeNameArg,
    dest: Annotated[Path, typer.Argument(help="New recipe file (or a folder to copy into).")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    """Copy a shipped recipe to start your own.

    Examples:
      qlora recipes copy tiny-sql my.yaml
      qlora recipes copy mistral7b-alpaca recipes/
    """
    from qlora_cli.recipe import copy_recipe

    written = copy_recipe(name, dest, force=force)
    typer.echo(f"wrote {written} (its adapter: {written.stem}); edit it, then: qlora validate {written}")


adapters_app = typer.Typer(help="Find and inspect trained adapters.", no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")


@adapters_app.command("list")
def adapters_list(adapters_dir: AdaptersDirOpt = None) -> None:
    """Every adapter in the adapters home, with its base, rank, data, final loss, size and date.

    Examples:
      qlora adapters list
      qlora adapters list --adapters-dir /data/adapters
    """
    from qlora_cli import adapters

    _print(adapters.render_list(adapters.run_list(adapters_dir)))


@adapters_app.command("show")
def adapters_show(
    name: Annotated[str, typer.Argument(help="Adapter name or folder.")], adapters_dir: AdaptersDirOpt = None
) -> None:
    """One adapter's record and the recipe that made it.

    Example:
      qlora adapters show sql
    """
    from qlora_cli import adapters

    typer.echo(adapters.render_show(adapters.run_show(name, adapters_dir)), nl=False)


def _verbose_first(argv: list[str]) -> list[str]:
    """click reads the group's -v only before the command; users also type it after (`qlora train x.yaml -v`),
    so it moves to the front. Arguments after `--` are left alone."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [arg for arg in argv[:end] if arg in VERBOSE_FLAGS]
    return flags[:1] + [arg for arg in argv[:end] if arg not in VERBOSE_FLAGS] + argv[end:]


def main() -> None:
    """The `qlora` entry point: each outcome leaves with its documented exit code (errors.ExitCode)."""
    try:
        app(args=_verbose_first(sys.argv[1:]), prog_name="qlora")
    except QloraError as error:
        from rich.text import Text

        _stderr().print(Text.assemble(("error: ", "bold red"), str(error)), highlight=False)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        sys.exit(ExitCode.INTERRUPTED)
    except Exception:
        # A bug, not the user's mistake: the traceback stays, and the code tells scripts it is not USER_ERROR.
        import traceback

        traceback.print_exc()
        sys.exit(ExitCode.CRASH)
