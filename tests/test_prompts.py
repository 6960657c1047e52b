from qlora_cli.prompts import REVERSE_INSTRUCTION, render_example, render_prompt

WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nList the names.\n\n### Input:\ntable people (name)\n\n### Response:\n"
)
WITHOUT_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSay hi.\n\n### Response:\n"
)


def test_golden_alpaca_prompts():
    assert render_prompt("List the names.", "table people (name)") == WITH_INPUT
    assert render_prompt("Say hi.") == WITHOUT_INPUT
    assert render_prompt("Say hi.", "   ") == WITHOUT_INPUT  # blank input is no input


def test_training_rows_use_the_generation_prompt():
    row = {"instruction": "List the names.", "input": "table people (name)", "output": "SELECT name FROM people;"}
    assert render_example(row) == {"prompt": WITH_INPUT, "completion": "SELECT name FROM people;"}


def test_reverse_task_learns_the_instruction_from_the_response():
    row = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    example = render_example(row, task="reverse")
    assert example["prompt"] == render_prompt(REVERSE_INSTRUCTION, "Hi!")
    assert example["completion"] == "Say hi."
