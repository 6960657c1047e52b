"""Generation on the real stack: errors raised inside the generation thread reach the caller; chat leaves cleanly;
the README's examples give the answers it shows."""

import io
import json
import os
import shlex
import shutil
import signal
import threading

import pytest
import torch
from helpers import REPO, TINY, finishes_within

from qlora_cli import train
from qlora_cli.data import read_jsonl
from qlora_cli.errors import QloraError
from qlora_cli.generate import BASE, Sampling, open_session
from qlora_cli.recipe import load_recipe

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def base_session(tiny_base):
    return open_session([BASE], base=str(tiny_base))


def stream(session, row, adapter, sampling) -> dict:
    """Drain session.stream in a thread: {"value": the text} or {"error": what it raised}; a regression then fails
    the test instead of hanging the suite."""
    return finishes_within(300, lambda: "".join(session.stream(row, adapter, sampling)))


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "generation with adapter 'none' ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); "
            "lower --max-new-tokens, use fewer adapters at once, or free the GPU",
        ),
        (RuntimeError("device-side assert"), "generation with adapter 'none' failed: RuntimeError: device-side assert"),
    ],
    ids=["out of memory", "other error"],
)
def test_an_error_inside_generation_surfaces_instead_of_hanging(base_session, failure, message):
    calls = []

    def fail_on_third_forward(module, args, output):
        calls.append(1)
        if len(calls) == 3:  # after two tokens have been streamed
            raise failure

    handle = base_session.model.register_forward_hook(fail_on_third_forward)
    try:
        outcome = stream(base_session, {"instruction": "List all users."}, BASE, Sampling(max_new_tokens=16))
    finally:
        handle.remove()
    assert isinstance(outcome.get("error"), QloraError), outcome
    assert str(outcome["error"]) == message


def test_streaming_still_yields_the_answer(base_session):
    outcome = stream(base_session, {"instruction": "List all users."}, BASE, Sampling(max_new_tokens=8))
    assert "error" not in outcome
    assert (
        outcome["value"].strip()
        == base_session.ask([{"instruction": "List all users."}], BASE, Sampling(max_new_tokens=8))[0]
    )


class Typed(io.StringIO):
    """stdin for `qlora generate --chat`: the lines as typed, then end of input (Ctrl-D), or with `ctrl_c` a real
    SIGINT at the next prompt."""

    def __init__(self, text: str, *, ctrl_c: bool = False):
        super().__init__(text)
        self.ctrl_c = ctrl_c

    def readline(self, *args) -> str:
        line = super().readline(*args)
        if not line and self.ctrl_c:
            os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt here, as at a terminal
        return line


def chat(run_cli, monkeypatch, stdin) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", stdin)
    return run_cli(["generate", "--chat", "-a", "none", "--base", str(TINY / "base"), "--max-new-tokens", "4"])


@pytest.mark.parametrize("leave", ["empty line", "ctrl-d", "ctrl-c"])
def test_chat_says_how_to_leave_and_leaves_cleanly(leave, run_cli, monkeypatch):
    typed = "List all users.\n" + {"empty line": "\nList all books.\n", "ctrl-d": "", "ctrl-c": ""}[leave]
    code, out, err = chat(run_cli, monkeypatch, Typed(typed, ctrl_c=leave == "ctrl-c"))
    assert (code, "Traceback" in err) == (0, False), err
    assert "an empty line, Ctrl-D or Ctrl-C leaves" in err
    assert out.count("you: ") == 2  # one answer, then the prompt it left at


def test_ctrl_c_during_an_answer_ends_the_chat_cleanly(run_cli, monkeypatch):
    from qlora_cli import generate

    real_load_model = generate.load_model
    chat_left = threading.Event()

    def load_model_interrupted_at_the_second_token(*args, **kwargs):
        model = real_load_model(*args, **kwargs)
        calls = []

        def press_ctrl_c(module, inputs, output):
            calls.append(1)
            if len(calls) == 2:  # from the generation thread; the signal lands in the main thread, as at a terminal
                os.kill(os.getpid(), signal.SIGINT)
                # The answer stays unfinished until the chat has left: on a loaded machine it could otherwise
                # end first, and the interrupt would land at the next prompt instead of during the answer.
                chat_left.wait(timeout=300)

        model.register_forward_hook(press_ctrl_c)
        return model

    monkeypatch.setattr(generate, "load_model", load_model_interrupted_at_the_second_token)
    try:
        code, out, err = chat(run_cli, monkeypatch, Typed("List all users.\nList all books.\n"))
    finally:
        chat_left.set()
    assert (code, "Traceback" in err) == (0, False), err
    assert out.count("you: ") == 1


def test_chat_warns_about_words_the_tokenizer_cannot_represent(run_cli, monkeypatch):
    code, _, err = chat(run_cli, monkeypatch, Typed("How many Zorblax have a genre of POETRY?\n"))
    assert code == 0 and "cannot represent: 'Zorblax', 'POETRY'" in " ".join(err.split())


def readme_examples() -> list[tuple[list[str], list[str], list[str]]]:
    """Every `qlora generate` and `qlora eval` command in README.md's code blocks, as (argv, lines typed at the
    chat prompt, lines a ```console block says it prints)."""
    examples = []
    block = None  # the open code block's language
    for line in (REPO / "README.md").read_text().splitlines():
        if line.startswith("```"):
            block = line.removeprefix("```") if block is None else None
            current = None
            continue
        command = line.removeprefix("$ ") if block == "console" else line
        if block is not None and command.startswith(("qlora generate", "qlora eval")):
            argv = shlex.split(command, comments=True)[1:]
            current = next((example for example in examples if example[0] == argv), None)  # shown twice: run once
            if current is None:
                current = (argv, [], [])
                examples.append(current)
        elif block == "console" and line.startswith("$ "):
            current = None
        elif block == "console" and current and line.startswith("you:"):
            current[1].extend([line.removeprefix("you:").strip()] if line.strip() != "you:" else [])
        elif block == "console" and current and line.strip():
            current[2].append(line)
    return examples


def test_the_readme_examples_give_the_answers_it_shows(trained_adapters, run_cli, monkeypatch, tmp_path):
    examples = readme_examples()
    assert sum(bool(printed) for _, _, printed in examples) >= 4 and len(examples) >= 8  # the parser found them
    home = tmp_path / "adapters"
    shutil.copytree(trained_adapters, home)
    # The README's DPO examples name sql-dpo: two steps of recipes/tiny-sql-dpo.yaml give one to ask.
    dpo = load_recipe(
        REPO / "recipes" / "tiny-sql-dpo.yaml",
        ["train.max_steps=2", "data.max_rows=16", f"train.output_dir={tmp_path / 'runs' / 'sql-dpo'}"],
    )
    train.run(dpo, adapters_dir=str(home))
    monkeypatch.chdir(REPO)  # the README's relative paths, as a user types them
    for argv, typed, printed in examples:
        if "--out" in argv:  # a fresh folder: --out makes it
            argv[argv.index("--out") + 1] = str(tmp_path / argv[argv.index("--out") + 1])
        if argv[0] == "eval":
            argv += ["--max-rows", "2"]
        monkeypatch.setattr("sys.stdin", Typed("".join(f"{line}\n" for line in typed)))
        code, out, err = run_cli([*argv, "--adapters-dir", str(home)])
        assert code == 0 and "Traceback" not in err, (argv, err)
        assert "cannot represent" not in err, (argv, err)  # every word of the examples is in the vocabulary
        for line in printed:
            assert line in out, (argv, line, out)
    eval_rows = json.loads((tmp_path / "runs" / "eval-sql.json").read_text())["results"][1]["rows"]
    assert len(eval_rows) == 2 and eval_rows[0]["prediction"].startswith("SELECT")
    answers = read_jsonl(tmp_path / "runs" / "answers.jsonl")
    prompts = read_jsonl(TINY / "demo-prompts.jsonl")
    assert [{key: row[key] for key in prompts[0]} for row in answers] == prompts  # every field as it was
    assert all(row["answer"].startswith("SELECT" if row["adapter"] == "sql" else "{") for row in answers)
