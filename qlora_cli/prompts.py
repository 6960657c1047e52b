"""Stage `prompts`: how rows become the tokens a model learns from, and the tokens generation starts from.

Training, `generate`, `eval` and `serve` all go through a `Renderer` built from the adapter's `Style`, so a
prompt at inference is the prompt training saw. Alpaca rows are rendered with Stanford Alpaca's wording;
conversations with a Jinja chat template (qlora_cli.chat), whose exact text the adapter records.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qlora_cli import chat
from qlora_cli.chat import IGNORE_INDEX, ChatTemplate, with_system
from qlora_cli.errors import QloraError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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


def tokenize_example(prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    """Prompt tokens are context only (label -100); the completion and its EOS are what the model learns."""
    return tokenize_examples([prompt], [completion], tokenizer, max_length)[0]


def tokenize_examples(
    prompts: list[str], completions: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[dict]:
    """Tokenize prompt + completion together and learn what follows the prompt's own tokens. Text that looks
    like a special token ("</s>" in a row) is tokenized as the characters it is: no template wrote it.

    The prompt's ids are taken as `generate` makes them (add_special_tokens=True: BOS where the tokenizer adds
    one), and the completion's are the ids that follow them in the joint tokenization: exactly what the model
    must produce after that prompt at inference. Tokenizing the completion alone would differ: SentencePiece
    puts '▁' in front of text that starts a string ('▁SE LECT' where the joint text gives 'SELECT').
    """
    prompt_batch = tokenizer(list(prompts), add_special_tokens=True, split_special_tokens=True)["input_ids"]
    joint_batch = tokenizer(
        [prompt + completion for prompt, completion in zip(prompts, completions)],
        add_special_tokens=True,
        split_special_tokens=True,
    )["input_ids"]
    examples = []
    for prompt, completion, prompt_ids, joint_ids in zip(prompts, completions, prompt_batch, joint_batch):
        if joint_ids[: len(prompt_ids)] == prompt_ids:
            context, response = prompt_ids, joint_ids[len(prompt_ids) :]
        else:
            context, response = _split_merged_boundary(prompt, completion, prompt_ids, joint_ids, tokenizer)
        response = response + [tokenizer.eos_token_id]  # always a label, also when pad = EOS
        examples.append(
            {
                "input_ids": (context + response)[:max_length],
                "labels": ([IGNORE_INDEX] * len(context) + response)[:max_length],
            }
        )
    return examples


def _split_merged_boundary(
    prompt: str, completion: str, prompt_ids: list[int], joint_ids: list[int], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    r"""(context, response) when a joint token straddles the prompt's end, e.g. tekken (byte-level BPE)
    merging the prompt's final ':\n' with a completion's leading '\n' into one ':\n\n' token.

    Generate feeds the prompt's own ids, so we keep them as the context and learn the completion as it
    continues from there: the completion's characters inside the straddling token, tokenized alone, then
    the joint tokens that start at or after the boundary. That split is taken only if it decodes to the
    same text as the joint tokenization: tokenized alone, a SentencePiece fragment gains a spurious '▁'
    (the very defect this module avoids). Otherwise the joint tokens are kept whole and learning starts
    where they part from the prompt's tokens: every completion character is learned, and so is the piece
    of prompt that the merge re-cut (usually one token), which generate's prompt ids cut differently.
    """
    if getattr(tokenizer, "is_fast", False):  # offsets need a fast tokenizer
        offsets = tokenizer(
            prompt + completion, add_special_tokens=True, split_special_tokens=True, return_offsets_mapping=True
        )["offset_mapping"]
        boundary = len(prompt)
        after = next(
            (index for index, (start, end) in enumerate(offsets) if start >= boundary and end > start), len(offsets)
        )
        gap_end = offsets[after][0] - boundary if after < len(offsets) else len(completion)
        gap = completion[:gap_end]
        gap_ids = tokenizer(gap, add_special_tokens=False, split_special_tokens=True)["input_ids"] if gap else []
        response = gap_ids + joint_ids[after:]
        if tokenizer.decode(prompt_ids + response) == tokenizer.decode(joint_ids):
            return prompt_ids, response
    shared = next(
        (index for index, (a, b) in enumerate(zip(prompt_ids, joint_ids)) if a != b),
        min(len(prompt_ids), len(joint_ids)),
    )
    return joint_ids[:shared], joint_ids[shared:]


def _joined(row: Mapping[str, str]) -> str:
    """An alpaca row's instruction and input as one user message."""
    context = (row.get("input") or "").strip()
    return f"{row['instruction']}\n\n{context}" if context else row["instruction"]


@dataclass(frozen=True)
class Style:
    """How rows become tokens for one adapter: recorded in its qlora.json, reused by generation.

    template: alpaca, none (the row's text as it is), chat or a Jinja file's name; template_text is the Jinja
    source for the last two, kept verbatim so that a later change of the tokenizer cannot change the prompts."""

    template: str = DEFAULT_TEMPLATE
    template_text: str | None = None
    system: str | None = None
    task: str = DEFAULT_TASK

    @property
    def is_chat(self) -> bool:
        return self.template_text is not None

    @property
    def template_sha256(self) -> str | None:
        return hashlib.sha256(self.template_text.encode()).hexdigest() if self.template_text is not None else None

    def chat_template(self) -> ChatTemplate:
        assert self.template_text is not None
        return ChatTemplate(name=self.template, source=self.template_text)


def as_conversation(row: Mapping, system: str | None) -> list[dict]:
    """Any checked row as messages: an alpaca or prompt/completion row is a one-turn conversation."""
    if "messages" in row:
        messages = [dict(message) for message in row["messages"]]
    elif "prompt" in row:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    else:
        messages = [{"role": "user", "content": _joined(row)}]
        if row.get("output"):
            messages.append({"role": "assistant", "content": row["output"]})
    return with_system(messages, system)


def as_prompt_completion(row: Mapping, style: Style) -> tuple[str, str]:
    """A row that is not a conversation as (prompt, completion) text for the alpaca or none template."""
    if "messages" in row:
        raise QloraError(
            f"the {style.template} template renders one prompt and its response, and this row is a conversation "
            "(messages): score it with an adapter trained on a chat template"
        )
    if "text" in row:
        return "", row["text"]
    if "prompt" in row:
        if style.template == "alpaca":
            return render_prompt(row["prompt"], "", style.template), row["completion"]
        return row["prompt"], row["completion"]
    if style.template == "none":
        return _joined(row), row.get("output", "")
    rendered = render_example({"output": "", **row}, style.template, style.task)
    return rendered["prompt"], rendered["completion"]


def alpaca_question(messages: list[Mapping]) -> dict[str, str]:
    """A conversation asked of an alpaca-template adapter: its last user message, read back the way an alpaca
    row is written as one (instruction, then a blank line and the input)."""
    asked = chat.last_content(messages, "user")
    instruction, _, context = asked.partition("\n\n")
    return {"instruction": instruction, "input": context}


class Renderer:
    """One adapter's Style applied with one tokenizer: training examples, generation prompts, stop ids."""

    def __init__(self, style: Style, tokenizer: PreTrainedTokenizerBase) -> None:
        self.style = style
        self.tokenizer = tokenizer
        self._stop_ids: list[int] | None = None

    def example(self, row: Mapping, *, train_on: str = "assistant", max_length: int = 100_000) -> dict:
        """{input_ids, labels} of one checked row (QloraError when its conversation cannot train)."""
        if self.style.is_chat:
            tools = row.get("tools") if isinstance(row.get("tools"), list) else None
            encoded = chat.encode_conversation(
                self.style.chat_template(),
                self.tokenizer,
                as_conversation(row, self.style.system),
                tools=tools,
                train_on=train_on,
            )
            ids, labels = encoded.input_ids, encoded.labels
        else:
            prompt, completion = as_prompt_completion(row, self.style)
            tokens = tokenize_examples([prompt], [completion], self.tokenizer, 10**9)[0]
            ids, labels = tokens["input_ids"], tokens["labels"]
            if train_on == "all" or "text" in row:
                labels = list(ids)
        return {"input_ids": ids[:max_length], "labels": labels[:max_length]}

    def preference(self, row: Mapping) -> dict:
        """{prompt_ids, chosen_ids, rejected_ids} of a checked preference row: each answer rendered as the
        response of a supervised example (its end of turn included), split where the learned tokens begin."""
        asked = {key: value for key, value in row.items() if key not in ("chosen", "rejected")}
        parts = {}
        for field in ("chosen", "rejected"):
            if "messages" in asked:
                answered = {**asked, "messages": [*asked["messages"], {"role": "assistant", "content": row[field]}]}
            elif "instruction" in asked:
                answered = {
                    "instruction": asked["instruction"],
                    "input": asked.get("input") or "",
                    "output": row[field],
                }
            else:
                answered = {"prompt": asked["prompt"], "completion": row[field]}
            example = self.example(answered, train_on="last")
            learned = [index for index, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
            parts[field] = example["input_ids"][: learned[0]], example["input_ids"][learned[0] : learned[-1] + 1]
        if parts["chosen"][0] != parts["rejected"][0]:
            raise QloraError("the template renders the prompt differently before the chosen and the rejected answer")
        return {
            "prompt_ids": parts["chosen"][0],
            "chosen_ids": parts["chosen"][1],
            "rejected_ids": parts["rejected"][1],
        }

    def conversation(self, row: Mapping) -> list[dict]:
        """The messages a chat prompt is made of: the row's, up to (not including) the turn to generate."""
        messages = as_conversation({key: value for key, value in row.items() if key != "output"}, self.style.system)
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        return messages

    def prompt_ids(self, row: Mapping) -> list[int]:
        """The ids generation starts from, for a row that asks (alpaca fields, a prompt, or messages)."""
        if self.style.is_chat:
            tools = row.get("tools") if isinstance(row.get("tools"), list) else None
            return chat.prompt_ids(self.style.chat_template(), self.tokenizer, self.conversation(row), tools=tools)
        return self.tokenizer(self.prompt_text(row), add_special_tokens=True, split_special_tokens=True)["input_ids"]

    def prompt_text(self, row: Mapping) -> str:
        """The prompt as text, for people to read."""
        if self.style.is_chat:
            return chat.render_marked(
                self.style.chat_template(), self.tokenizer, self.conversation(row), add_generation_prompt=True
            )[0]
        if "messages" in row:
            row = alpaca_question(row["messages"])
        return as_prompt_completion({"output": "", **row} if "instruction" in row else row, self.style)[0]

    def stop_ids(self) -> list[int]:
        """Every id that ends a reply: the template's end of turn and EOS."""
        if self._stop_ids is None:
            self._stop_ids = [self.tokenizer.eos_token_id]
            if self.style.is_chat:
                with contextlib.suppress(QloraError):  # a template without one: training names the rows it refuses
                    self._stop_ids = chat.end_of_turn_ids(self.style.chat_template(), self.tokenizer)
        return self._stop_ids

    def end_of_turn_tokens(self) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(self.stop_ids())
