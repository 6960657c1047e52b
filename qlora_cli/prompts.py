"""Prompt templates: one function renders training rows and `generate` prompts alike.

A template that drifts between training and inference silently costs accuracy, so every
caller — data building, generation, evaluation — goes through `render_prompt`.
"""

from __future__ import annotations

from collections.abc import Mapping

# What a prompt is rendered with when nothing says otherwise: the recipe's defaults (data.template,
# data.task), and what an adapter directory without a qlora.json record reads as.
DEFAULT_TEMPLATE = "alpaca"
DEFAULT_TASK = "forward"

TEMPLATES: dict[str, dict[str, str]] = {
    # Stanford Alpaca's wording, byte for byte: adapters trained elsewhere on alpaca data expect it.
    "alpaca": {
        "with_input": (
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        ),
        "without_input": (
            "Below is an instruction that describes a task. Write a response that appropriately "
            "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        ),
    },
}

# The reverse task (learn to write the instruction that a response answers) reuses the alpaca
# frame: the original response becomes the input, the original instruction the completion.
REVERSE_INSTRUCTION = "Write the instruction that the following response answers."


def render_prompt(instruction: str, input: str = "", template: str = DEFAULT_TEMPLATE) -> str:
    """The text the model sees before its response."""
    forms = TEMPLATES[template]
    if input and input.strip():
        return forms["with_input"].format(instruction=instruction, input=input)
    return forms["without_input"].format(instruction=instruction)


def render_example(
    row: Mapping[str, str], template: str = DEFAULT_TEMPLATE, task: str = DEFAULT_TASK
) -> dict[str, str]:
    """One alpaca row -> {"prompt", "completion"}; EOS is appended by the tokenizer stage, not here."""
    if task == "reverse":
        return {
            "prompt": render_prompt(REVERSE_INSTRUCTION, row["output"], template),
            "completion": _join_instruction(row),
        }
    return {"prompt": render_prompt(row["instruction"], row.get("input") or "", template), "completion": row["output"]}


def _join_instruction(row: Mapping[str, str]) -> str:
    context = (row.get("input") or "").strip()
    return f"{row['instruction']}\n\n{context}" if context else row["instruction"]
