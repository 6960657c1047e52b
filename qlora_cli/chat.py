"""Stage `chat`: conversations rendered by a chat template and tokenized with the loss on the assistant's words.

The loss mask comes from the rendered text itself, not from `{% generation %}` tags (few templates have
them) nor from rendering prefixes of the conversation (Mistral's templates move the system prompt to the
last user turn, so a prefix is not a prefix). Each message's content is wrapped in private-use markers
before rendering; where the markers land is where the content is, whatever the template did around it.

Tokenization follows the same marks. Control tokens (`<|im_end|>`, `[INST]`, `</s>`) count only where the
template wrote them: text between two of them is encoded in one call with special-token matching off, so
"<|im_end|>" typed by a user is learned as the characters it is. This is also how mistral-common encodes
Mistral conversations, and the tests hold us to its token ids.

Every trained assistant turn must end with a control token the model learns to emit (the end of turn:
`<|im_end|>`, `<|eot_id|>`, `</s>`): a conversation whose template writes none is refused, since an
adapter trained on it would never stop. Generation stops at every end-of-turn token the template uses.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qlora_cli.errors import QloraError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
# U+E000 opens a message's content, followed by one character that numbers the message (from U+F0000 on,
# a private-use plane no tokenizer vocabulary or user text has any business with); U+E001 closes it.
OPEN, CLOSE, FIRST_NUMBER = "\ue000", "\ue001", 0xF0000
MARKS = re.compile(f"{OPEN}(.)|{CLOSE}", re.DOTALL)
# A two-turn conversation rendered once to find the template's end-of-turn tokens for generation.
PROBE = (
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye"},
)


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and where it came from: "chat" (the tokenizer's own) or a file's name."""

    name: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()

    def render(
        self,
        tokenizer: PreTrainedTokenizerBase,
        messages: Sequence[Mapping],
        *,
        tools: list | None = None,
        add_generation_prompt: bool = False,
    ) -> str:
        """The template's text for a conversation; a template that refuses it (roles out of order) raises
        QloraError with the template's own words."""
        from jinja2.exceptions import TemplateError

        try:
            return tokenizer.apply_chat_template(
                [dict(message) for message in messages],
                chat_template=self.source,
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
        except TemplateError as error:
            raise QloraError(f"the {self.name} template refuses this conversation: {error}") from None


@dataclass(frozen=True)
class Turn:
    """Where one message's content landed in the rendered text."""

    index: int  # in the conversation
    role: str
    start: int
    end: int


@dataclass(frozen=True)
class Encoded:
    """A conversation's token ids, their labels, and per trained assistant turn the id that ends it."""

    input_ids: list[int]
    labels: list[int]
    end_of_turn_ids: tuple[int, ...]


def template_of(tokenizer: PreTrainedTokenizerBase, model_name: str) -> ChatTemplate:
    """The tokenizer's own chat template (data.template: chat)."""
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # several named templates: the default one is what chat UIs use
        source = source.get("default")
    if not source:
        raise QloraError(no_chat_template(model_name))
    return ChatTemplate(name="chat", source=source)


def no_chat_template(model_name: str) -> str:
    return (
        f"data.template: chat: the tokenizer of {model_name} has no chat_template. Set data.template to a "
        ".jinja file beside the recipe (each assistant turn must end with a token such as {{ eos_token }}), "
        "or train alpaca rows with data.template: alpaca"
    )


def render_marked(
    template: ChatTemplate,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping],
    *,
    tools: list | None = None,
    add_generation_prompt: bool = False,
) -> tuple[str, list[Turn]]:
    """The rendered text and where each message's content lies in it."""
    marked = [
        {**message, "content": f"{OPEN}{chr(FIRST_NUMBER + index)}{message['content']}{CLOSE}"}
        if isinstance(message.get("content"), str) and message["content"]
        else dict(message)  # a tool call's empty content: templates test it for truth, a mark would change that
        for index, message in enumerate(messages)
    ]
    text = template.render(tokenizer, marked, tools=tools, add_generation_prompt=add_generation_prompt)
    plain, turns, opened = [], [], None
    position = cursor = 0
    for mark in MARKS.finditer(text):
        plain.append(text[cursor : mark.start()])
        position += mark.start() - cursor
        cursor = mark.end()
        if mark.group(1) is not None:
            opened = (ord(mark.group(1)) - FIRST_NUMBER, position)
        elif opened is not None:
            index, start = opened
            turns.append(Turn(index=index, role=messages[index]["role"], start=start, end=position))
            opened = None
    plain.append(text[cursor:])
    rendered = "".join(plain)
    unmarked = template.render(tokenizer, messages, tools=tools, add_generation_prompt=add_generation_prompt)
    if rendered != unmarked:
        raise QloraError(
            f"the {template.name} template changes the text of messages as it renders them (it looks inside the "
            "content), so qlora cannot tell which tokens are the assistant's; use a template that writes the content as it is"
        )
    return rendered, turns


def control_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The added tokens a template may write (`<s>`, `[INST]`, `<|im_end|>`), by their text."""
    return {token.content: token_id for token_id, token in tokenizer.added_tokens_decoder.items()}


def encode_text(
    tokenizer: PreTrainedTokenizerBase, text: str, user_spans: Sequence[tuple[int, int]], controls: Mapping[str, int]
) -> tuple[list[int], list[tuple[int, int]], list[bool]]:
    """(ids, character offsets, is-control) of rendered text. Control tokens are matched only outside
    `user_spans` (the messages' contents): there, lookalike text stays text."""
    if controls:
        pattern = re.compile("|".join(re.escape(token) for token in sorted(controls, key=len, reverse=True)))
        boundaries = [
            found.span()
            for found in pattern.finditer(text)
            if not any(start < found.end() and found.start() < end for start, end in user_spans)
        ]
    else:
        boundaries = []
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    control: list[bool] = []
    cursor = 0
    for start, end in [*boundaries, (len(text), len(text))]:
        if start > cursor:
            run = tokenizer(
                text[cursor:start],
                add_special_tokens=False,
                split_special_tokens=True,
                return_offsets_mapping=True,
            )
            ids += run["input_ids"]
            offsets += [(cursor + a, cursor + b) for a, b in run["offset_mapping"]]
            control += [False] * len(run["input_ids"])
        if end > start:
            ids.append(controls[text[start:end]])
            offsets.append((start, end))
            control.append(True)
        cursor = end
    return ids, offsets, control


def encode_conversation(
    template: ChatTemplate,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping],
    *,
    tools: list | None = None,
    train_on: str = "assistant",
    trained_from: int = 0,
) -> Encoded:
    """Token ids and labels of a whole conversation. `train_on`: "assistant" learns every assistant turn
    from message `trained_from` on, "last" only the last one, "all" every token. Each learned turn ends with
    its end-of-turn token, learned too; QloraError when the template writes none."""
    text, turns = render_marked(template, tokenizer, messages, tools=tools)
    ids, offsets, control = encode_text(tokenizer, text, [(t.start, t.end) for t in turns], control_tokens(tokenizer))
    calls = _tool_call_turns(template, tokenizer, messages, tools, text, turns)
    assistant = sorted(
        [turn for turn in [*turns, *calls] if turn.role == "assistant" and turn.index >= trained_from],
        key=lambda turn: turn.index,
    )
    if not assistant:
        raise QloraError("no assistant turn to learn")
    learned = assistant[-1:] if train_on == "last" else assistant
    labels = list(ids) if train_on == "all" else [IGNORE_INDEX] * len(ids)
    ends = []
    # A call is the template's rendering of structured data: learned up to the template's end of turn,
    # found once per conversation (it renders a probe conversation).
    stops = set(end_of_turn_ids(template, tokenizer)) if calls else set()
    for turn in learned:
        if turn in calls:
            first = next((i for i, (start, _) in enumerate(offsets) if start >= turn.start), len(ids))
            end_token = next((i for i in range(first, len(ids)) if control[i] and ids[i] in stops), None)
            tokens = list(range(first, (end_token or first) + 1))
        else:
            tokens = [i for i, (start, end) in enumerate(offsets) if start < turn.end and turn.start < end]
            replies = [(other.start, other.end) for other in assistant if other.index > turn.index]
            end_token = _end_of_turn(text, offsets, control, tokens[-1], replies) if tokens else None
        if end_token is None:
            after = text[turn.end : turn.end + 30]
            written = f"writes {after!r} after it" if after else "ends the text there"
            raise QloraError(
                f"assistant turn (message {turn.index + 1}) does not end with an end-of-turn token: the "
                f"{template.name} template {written}, so the adapter would never learn to stop. "
                "Make the template write one after each assistant message (e.g. {{ eos_token }})"
            )
        labels[tokens[0] : end_token + 1] = ids[tokens[0] : end_token + 1]
        ends.append(ids[end_token])
    return Encoded(input_ids=ids, labels=labels, end_of_turn_ids=tuple(ends))


def _tool_call_turns(
    template: ChatTemplate,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping],
    tools: list | None,
    text: str,
    turns: list[Turn],
) -> list[Turn]:
    """Where each assistant message that only calls tools starts (it has no content to mark): right after the
    cue the template writes for the assistant (its generation prompt), found where the previous message's
    content ends. `end` is that start too: the call runs to the template's end-of-turn token."""
    found = []
    for index, message in enumerate(messages):
        if message.get("role") != "assistant" or message.get("content") or not message.get("tool_calls"):
            continue
        before = [turn.end for turn in turns if turn.index < index]
        cue_text, cue_turns = render_marked(
            template, tokenizer, messages[:index], tools=tools, add_generation_prompt=True
        )
        cue = cue_text[max((turn.end for turn in cue_turns), default=0) :]
        anchor = max(before, default=0)
        at = text.find(cue, anchor) if cue else -1
        if at < 0 or text[anchor:at].strip():
            raise QloraError(
                f"tool call (message {index + 1}): the {template.name} template does not render it after its "
                "assistant cue, so qlora cannot tell which tokens are the call"
            )
        found.append(Turn(index=index, role="assistant", start=at + len(cue), end=at + len(cue)))
    return found


def _end_of_turn(
    text: str, offsets: list[tuple[int, int]], control: list[bool], last: int, replies: list[tuple[int, int]]
) -> int | None:
    """The index of the control token that closes a turn whose content ends at token `last`: the first one
    after it with only whitespace between, or the content of later assistant messages that the template
    joined to this one (mistral-common writes two replies in a row as one turn). None when other text or
    the end comes first."""
    for i in range(last + 1, len(offsets)):
        if control[i]:
            return i
        start, end = offsets[i]
        joined = any(reply_start < end and start < reply_end for reply_start, reply_end in replies)
        if text[start:end].strip() and not joined:
            return None
    return None


def prompt_ids(
    template: ChatTemplate,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Mapping],
    *,
    tools: list | None = None,
) -> list[int]:
    """The ids generation starts from: the conversation so far and the template's cue for the assistant."""
    text, turns = render_marked(template, tokenizer, messages, tools=tools, add_generation_prompt=True)
    return encode_text(tokenizer, text, [(t.start, t.end) for t in turns], control_tokens(tokenizer))[0]


def end_of_turn_ids(template: ChatTemplate, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id a reply may end with: the template's end of turn and EOS."""
    found = encode_conversation(template, tokenizer, PROBE).end_of_turn_ids
    return list(dict.fromkeys([*found, tokenizer.eos_token_id]))


def last_content(messages: Sequence[Mapping], role: str) -> str:
    """The text of the last `role` message ("" when there is none)."""
    return next((m.get("content") or "" for m in reversed(messages) if m.get("role") == role), "")


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """`system` in front of a conversation that has no system message of its own."""
    if system is None or (messages and messages[0].get("role") == "system"):
        return messages
    return [{"role": "system", "content": system}, *messages]
