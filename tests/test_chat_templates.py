"""Chat rendering checked against references that no one here wrote.

- Mistral: mistral-common, Mistral's own encoder, gives the token ids of a conversation; ours must be the same,
  through Mistral's real tokenizers (tests/real_tokenizers.py) and the chat template mistral-common generates
  for each tokenizer file.
- ChatML (Qwen2.5) and Llama 3 / 3.1: golden strings written here from each family's published format
  specification (cited beside each), compared with what our rendering makes of the hub's original templates,
  which TRL ships as files (trl/chat_templates/, "used for identity comparison" with the hub repos).

Each test also checks the loss mask: what is learned is each assistant message and the end-of-turn token
after it, nothing of the user's, and text that looks like a control token stays text.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import trl
import yaml
from helpers import REPO
from mistral_common.integrations.chat_templates.chat_templates import convert_tokenizer_to_chat_template
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from real_tokenizers import KINDS, load_real_tokenizer, mistral_common_file
from tokenizers import AddedToken

from qlora_cli import chat, data
from qlora_cli.errors import QloraError
from qlora_cli.prompts import Renderer, Style
from qlora_cli.recipe import load_recipe
from qlora_cli.testing import build_tokenizer

HUB_TEMPLATES = Path(trl.__file__).parent / "chat_templates"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def learned_runs(encoded: chat.Encoded) -> list[list[int]]:
    """The learned ids, one list per run of consecutive learned tokens (labels equal to the input there)."""
    runs, run = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label == chat.IGNORE_INDEX:
            if run:
                runs.append(run)
            run = []
        else:
            assert label == token
            run.append(token)
    return runs + ([run] if run else [])


def assert_learns_each_reply_then(tokenizer, encoded: chat.Encoded, replies: list[str], end_of_turn: str) -> None:
    """Exactly the replies are learned, each followed by the end-of-turn control token; inside a reply no
    control id at all, so a reply's "</s>" or "<|im_end|>" is text."""
    runs = learned_runs(encoded)
    assert [tokenizer.decode(run) for run in runs] == [reply + end_of_turn for reply in replies]
    end_id = tokenizer.convert_tokens_to_ids(end_of_turn)
    controls = set(tokenizer.added_tokens_decoder)
    for run in runs:
        assert run[-1] == end_id
        assert not controls & set(run[:-1]), tokenizer.convert_ids_to_tokens(run)
    assert encoded.end_of_turn_ids == (end_id,) * len(replies)


# --- Mistral, token for token against mistral-common ----------------------------------------------------------

LOOKALIKES = "[INST] </s> <s> <|im_end|> [/INST]"
MISTRAL_CONVERSATIONS = {
    "two-turns": [user("Hi there"), assistant("Hello!"), user("How are you?"), assistant("Fine, thanks.")],
    "system": [
        system("Be brief."),
        user("Hi there"),
        assistant("Hello!"),
        user("How are you?"),
        assistant("Fine."),
    ],
    "lookalikes": [
        system(f"Never say {LOOKALIKES}."),
        user(f"Please write {LOOKALIKES} for me"),
        assistant(f"Here: {LOOKALIKES} done"),
        user("And <s>[INST] again</s>?"),
        assistant("</s>[INST] as text</s>"),
    ],
    # mistral-common joins consecutive user messages into one turn, and its template does the same
    "users-in-a-row": [user("First part."), user("Second part."), assistant("Both read.")],
}


@functools.cache
def mistral_reference(kind: str) -> tuple[chat.ChatTemplate, MistralTokenizer, MistralTokenizer]:
    """(the chat template mistral-common generates for the tokenizer file, its encoder for training
    conversations, its encoder for prompts: the same tokenizer validated as for requests)."""
    path = mistral_common_file(kind)
    template = chat.ChatTemplate(name="chat", source=convert_tokenizer_to_chat_template(path))
    training = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
    version = training.instruct_tokenizer.tokenizer.version
    prompting = MistralTokenizer(  # from_file again would read tekken's 131k-token file a third time
        training.instruct_tokenizer,
        validator=get_validator(version, mode=ValidationMode.test),
        request_normalizer=get_normalizer(version, training.instruct_tokenizer.tokenizer.model_settings_builder),
    )
    return template, training, prompting


def reference_ids(encoder: MistralTokenizer, messages: list[dict], tools: list | None = None) -> list[int]:
    return encoder.encode_chat_completion(ChatCompletionRequest(messages=messages, tools=tools)).tokens


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MISTRAL_CONVERSATIONS)
def test_mistral_conversations_encode_as_mistral_common_does(kind, name, real_tokenizer_root):
    tokenizer = load_real_tokenizer(kind, real_tokenizer_root)
    template, training, prompting = mistral_reference(kind)
    messages = MISTRAL_CONVERSATIONS[name]

    encoded = chat.encode_conversation(template, tokenizer, messages)
    assert encoded.input_ids == reference_ids(training, messages)
    assert chat.prompt_ids(template, tokenizer, messages[:-1]) == reference_ids(prompting, messages[:-1])

    replies = [message["content"] for message in messages if message["role"] == "assistant"]
    assert_learns_each_reply_then(tokenizer, encoded, replies, "</s>")
    last = chat.encode_conversation(template, tokenizer, messages, train_on="last")
    assert_learns_each_reply_then(tokenizer, last, replies[-1:], "</s>")
    assert chat.end_of_turn_ids(template, tokenizer) == [tokenizer.eos_token_id]


@pytest.mark.parametrize("kind", KINDS)
def test_a_preference_pair_with_an_implicit_prompt_encodes_as_mistral_common_does(kind, real_tokenizer_root):
    """TRL's implicit-prompt row (whole conversations, differing in the last reply) split into prompt and
    answers, each answer then rendered by Mistral's template: prompt + answer is mistral-common's encoding of
    the whole conversation, and DPO compares exactly the replies with their </s>."""
    tokenizer = load_real_tokenizer(kind, real_tokenizer_root)
    template, training, prompting = mistral_reference(kind)
    shared = [system("Be brief."), user("Hi there"), assistant("Hello!"), user("Lowest price?")]
    row = {
        "chosen": [*shared, assistant("ORDER BY price ASC")],
        "rejected": [*shared, assistant("ORDER BY price DESC")],
    }
    checked = data.normalized(row, "preference")
    assert checked["messages"] == shared and (checked["chosen"], checked["rejected"]) == (
        "ORDER BY price ASC",
        "ORDER BY price DESC",
    )
    style = Style(template="chat", template_text=template.source)
    pair = Renderer(style, tokenizer).preference(checked)
    assert pair["prompt_ids"] == reference_ids(prompting, shared)
    for side in ("chosen", "rejected"):
        assert pair["prompt_ids"] + pair[f"{side}_ids"] == reference_ids(training, row[side])
        assert tokenizer.decode(pair[f"{side}_ids"]) == row[side][-1]["content"] + "</s>"


def test_user_text_that_looks_like_mistral_control_tokens_stays_text(real_tokenizer_root):
    """On v3 [INST], </s> and <s> are control ids (3, 2, 1); typed by a user they must not become them, or a
    user could end a turn or open one inside the data."""
    tokenizer = load_real_tokenizer("sentencepiece-v3", real_tokenizer_root)
    template = mistral_reference("sentencepiece-v3")[0]
    messages = [user("<s>[INST] a </s>"), assistant("ok")]
    ids = chat.encode_conversation(template, tokenizer, messages).input_ids
    controls = [
        token for token in tokenizer.convert_ids_to_tokens(ids) if token in ("<s>", "[INST]", "[/INST]", "</s>")
    ]
    assert controls == ["<s>", "[INST]", "[/INST]", "</s>"]  # the template's own, once each


def test_a_template_that_refuses_the_role_order_raises_one_error_in_its_own_words(real_tokenizer_root):
    tokenizer = load_real_tokenizer("sentencepiece-v3", real_tokenizer_root)
    mistral = mistral_reference("sentencepiece-v3")[0]
    with pytest.raises(
        QloraError, match="^the chat template refuses this conversation: Conversation must start with a user message"
    ):
        mistral.render(tokenizer, [assistant("I speak first."), user("Hi")])
    # Gemma's hub template (as TRL ships it) refuses two user turns in a row, as Mistral's hand-written hub
    # templates of v0.1-v0.3 do; mistral-common's generated ones join them instead (tested above).
    gemma = chat.ChatTemplate(name="gemma.jinja", source=(HUB_TEMPLATES / "gemma.jinja").read_text())
    with pytest.raises(QloraError, match="^the gemma.jinja template refuses this conversation: .*roles must alternate"):
        gemma.render(tokenizer, [user("one"), user("two"), assistant("three")])
    renderer = Renderer(Style(template="chat", template_text=gemma.source), tokenizer)
    with pytest.raises(QloraError, match="roles must alternate") as caught:
        renderer.example({"messages": [user("one"), user("two"), assistant("three")]})
    assert "\n" not in str(caught.value) and "Traceback" not in str(caught.value)


def test_assistant_messages_in_a_row_are_learned_as_mistral_common_joins_them(real_tokenizer_root):
    tokenizer = load_real_tokenizer("sentencepiece-v3", real_tokenizer_root)
    template, training, _ = mistral_reference("sentencepiece-v3")
    messages = [user("Hi"), assistant("First part."), assistant("Second part.")]
    encoded = chat.encode_conversation(template, tokenizer, messages)
    assert encoded.input_ids == reference_ids(training, messages)
    assert [tokenizer.decode(run) for run in learned_runs(encoded)] == ["First part.\n\nSecond part.</s>"]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
TOOL_CONVERSATION = [
    user("Weather in Paris?"),
    {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "abc123def",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "abc123def", "content": "sunny, 21 degrees"},
    assistant("It is sunny, 21 degrees."),
]


@pytest.mark.parametrize("kind", ["sentencepiece-v3", "tekken"])  # v1 has no tool tokens
def test_a_tool_call_row_encodes_as_mistral_common_and_learns_the_call(kind, real_tokenizer_root):
    """A row as data.normalized leaves it (a call's content is "") through the Renderer training uses."""
    tokenizer = load_real_tokenizer(kind, real_tokenizer_root)
    template, training, _ = mistral_reference(kind)
    row = data.normalized({"messages": TOOL_CONVERSATION, "tools": TOOLS}, "messages")
    example = Renderer(Style(template="chat", template_text=template.source), tokenizer).example(row)
    assert example["input_ids"] == reference_ids(training, TOOL_CONVERSATION, TOOLS)
    runs = learned_runs(chat.Encoded(example["input_ids"], example["labels"], ()))
    call, reply = runs  # the call is a reply to learn too, from the control token that announces it
    assert call[0] == tokenizer.convert_tokens_to_ids("[TOOL_CALLS]") and call[-1] == tokenizer.eos_token_id
    assert '"name": "get_weather", "arguments": {"city": "Paris"}' in tokenizer.decode(call)
    assert tokenizer.decode(reply) == "It is sunny, 21 degrees.</s>"


# --- ChatML and Llama 3: golden strings from the published specifications ------------------------------------


def family_tokenizer(goldens: list[str], controls: list[str], bos: str | None, eos: str):
    """A word-level tokenizer whose vocabulary covers the goldens, with the family's control tokens as special
    added tokens, and BOS/EOS as the family's tokenizer_config sets them."""
    tokenizer = build_tokenizer(goldens)
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in controls], special_tokens=True)
    tokenizer.bos_token = bos
    tokenizer.eos_token = eos
    return tokenizer


def check_golden(tokenizer, template_file: str, messages: list[dict], golden: str, prompt: str, end_of_turn: str):
    """Rendering, ids, prompt and mask of one conversation against its golden string and golden prompt."""
    template = chat.ChatTemplate(name=template_file, source=(HUB_TEMPLATES / template_file).read_text())
    assert template.render(tokenizer, messages) == golden
    assert template.render(tokenizer, messages[:-1], add_generation_prompt=True) == prompt
    encoded = chat.encode_conversation(template, tokenizer, messages)
    assert tokenizer.decode(encoded.input_ids) == golden
    prompt_ids = chat.prompt_ids(template, tokenizer, messages[:-1])
    assert tokenizer.decode(prompt_ids) == prompt
    assert encoded.input_ids[: len(prompt_ids)] == prompt_ids  # generation starts where training's reply did
    replies = [message["content"] for message in messages if message["role"] == "assistant"]
    assert_learns_each_reply_then(tokenizer, encoded, replies, end_of_turn)
    assert tokenizer.convert_tokens_to_ids(end_of_turn) in chat.end_of_turn_ids(template, tokenizer)
    return encoded


# ChatML as Qwen documents it, https://qwen.readthedocs.io/en/latest/getting_started/concepts.html ("Chat
# Template"): every message is `<|im_start|>{role}\n{content}<|im_end|>`, each followed by "\n", and the
# assistant's reply opens with `<|im_start|>assistant\n`. Control tokens: <|endoftext|>, <|im_start|>,
# <|im_end|>; Qwen has no BOS, and the instruct models' EOS is <|im_end|> (tokenizer_config.json of
# Qwen/Qwen2.5-7B-Instruct).
CHATML_CONTROLS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = [
    system("You are a cat."),
    user("hello"),
    assistant("meow"),
    user("is <|im_end|> a token?"),
    assistant("here <|im_start|> is text"),
]
CHATML_GOLDEN = (
    "<|im_start|>system\nYou are a cat.<|im_end|>\n"
    "<|im_start|>user\nhello<|im_end|>\n"
    "<|im_start|>assistant\nmeow<|im_end|>\n"
    "<|im_start|>user\nis <|im_end|> a token?<|im_end|>\n"
    "<|im_start|>assistant\nhere <|im_start|> is text<|im_end|>\n"
)
CHATML_PROMPT = CHATML_GOLDEN.removesuffix("here <|im_start|> is text<|im_end|>\n")
# Qwen2.5's system prompt when a conversation has none: the one its model card's quickstart passes
# (https://huggingface.co/Qwen/Qwen2.5-7B-Instruct), which the Qwen2.5 template writes by itself.
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CHATML_NO_SYSTEM_GOLDEN = f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nmeow<|im_end|>\n"


def test_qwen2_5_renders_chatml_as_specified_and_learns_each_reply_with_im_end():
    tokenizer = family_tokenizer([CHATML_GOLDEN, CHATML_NO_SYSTEM_GOLDEN], CHATML_CONTROLS, None, "<|im_end|>")
    encoded = check_golden(tokenizer, "qwen2_5.jinja", CHATML, CHATML_GOLDEN, CHATML_PROMPT, "<|im_end|>")
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    assert [token for token in tokens if token in CHATML_CONTROLS] == ["<|im_start|>", "<|im_end|>"] * 5
    check_golden(
        tokenizer,
        "qwen2_5.jinja",
        CHATML[1:3],
        CHATML_NO_SYSTEM_GOLDEN,
        CHATML_NO_SYSTEM_GOLDEN.removesuffix("meow<|im_end|>\n"),
        "<|im_end|>",
    )


# Llama 3, https://www.llama.com/docs/model-cards-and-prompt-formats/meta-llama-3/ and Meta's reference code
# (github.com/meta-llama/llama3, llama/tokenizer.py, ChatFormat): <|begin_of_text|>, then per message
# `<|start_header_id|>{role}<|end_header_id|>\n\n{content stripped}<|eot_id|>`; the reply opens with the
# assistant header. <|eot_id|> ends a turn, <|end_of_text|> ends the text (Meta-Llama-3-8B-Instruct's EOS as
# first released, which leaves the end of turn to be found in the template).
LLAMA_CONTROLS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
]
LLAMA = [
    system("You are a helpful AI assistant for travel tips and recommendations"),
    user("What can you help me with?"),
    assistant("Trips and tips."),
    user("Is <|eot_id|> a token?"),
    assistant("Here <|start_header_id|> is text."),
]


def llama_turn(role: str, content: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"


LLAMA3_GOLDEN = "<|begin_of_text|>" + "".join(llama_turn(m["role"], m["content"]) for m in LLAMA)
LLAMA3_PROMPT = (
    "<|begin_of_text|>"
    + "".join(llama_turn(m["role"], m["content"]) for m in LLAMA[:-1])
    + "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
# Llama 3.1, https://www.llama.com/docs/model-cards-and-prompt-formats/llama3_1/: the same turns, and a system
# turn always, which opens with "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n" before the
# system prompt (if any). The hub template's date, when the caller passes none (qlora passes none), is
# "26 Jul 2024", so the text does not change with the calendar. Llama-3.1-8B-Instruct's EOS is <|eot_id|>.
LLAMA31_HEADER = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
LLAMA31_GOLDEN = LLAMA3_GOLDEN.replace(
    "<|end_header_id|>\n\nYou are a helpful", f"<|end_header_id|>\n\n{LLAMA31_HEADER}You are a helpful"
)
LLAMA31_PROMPT = LLAMA3_PROMPT.replace(
    "<|end_header_id|>\n\nYou are a helpful", f"<|end_header_id|>\n\n{LLAMA31_HEADER}You are a helpful"
)
LLAMA31_NO_SYSTEM_GOLDEN = (
    "<|begin_of_text|>"
    + f"<|start_header_id|>system<|end_header_id|>\n\n{LLAMA31_HEADER}<|eot_id|>"
    + llama_turn("user", "What can you help me with?")
    + llama_turn("assistant", "Trips and tips.")
)


def test_llama3_renders_as_specified_and_learns_each_reply_with_eot_id():
    tokenizer = family_tokenizer([LLAMA3_GOLDEN], LLAMA_CONTROLS, "<|begin_of_text|>", "<|end_of_text|>")
    encoded = check_golden(tokenizer, "llama3.jinja", LLAMA, LLAMA3_GOLDEN, LLAMA3_PROMPT, "<|eot_id|>")
    tokens = tokenizer.convert_ids_to_tokens(encoded.input_ids)
    assert tokens.count("<|eot_id|>") == 5 and tokens.count("<|start_header_id|>") == 5  # the user's are text
    template = chat.ChatTemplate(name="llama3.jinja", source=(HUB_TEMPLATES / "llama3.jinja").read_text())
    assert chat.end_of_turn_ids(template, tokenizer) == tokenizer.convert_tokens_to_ids(
        ["<|eot_id|>", "<|end_of_text|>"]
    )


def test_llama3_1_renders_as_specified_with_its_fixed_date_header():
    tokenizer = family_tokenizer(
        [LLAMA31_GOLDEN, LLAMA31_NO_SYSTEM_GOLDEN], LLAMA_CONTROLS, "<|begin_of_text|>", "<|eot_id|>"
    )
    check_golden(tokenizer, "llama3_1.jinja", LLAMA, LLAMA31_GOLDEN, LLAMA31_PROMPT, "<|eot_id|>")
    check_golden(
        tokenizer,
        "llama3_1.jinja",
        LLAMA[1:3],
        LLAMA31_NO_SYSTEM_GOLDEN,
        LLAMA31_NO_SYSTEM_GOLDEN.removesuffix("Trips and tips.<|eot_id|>"),
        "<|eot_id|>",
    )


# --- The shipped chat recipes -------------------------------------------------------------------------------

CHAT_RECIPES = {
    "mistral7b-chat": ("mistralai/Mistral-7B-Instruct-v0.3", "HuggingFaceH4/ultrachat_200k", "train_sft"),
    "llama3.1-8b-chat": ("meta-llama/Llama-3.1-8B-Instruct", "HuggingFaceH4/ultrachat_200k", "train_sft"),
    "qwen2.5-7b-chat": ("Qwen/Qwen2.5-7B-Instruct", "HuggingFaceH4/no_robots", "train"),
}


@pytest.mark.parametrize("name", CHAT_RECIPES)
def test_chat_recipes_train_their_model_on_messages_in_its_own_template(name):
    path = REPO / "recipes" / f"{name}.yaml"
    recipe = load_recipe(path)  # the closed schema: a misspelt key fails here
    model, dataset, split = CHAT_RECIPES[name]
    assert (recipe.model.id, recipe.data.path, recipe.data.split) == (model, dataset, split)
    assert (recipe.data.format, recipe.data.template, recipe.data.train_on) == ("messages", "chat", "assistant")
    assert recipe.model.device == "cuda"
    assert set(yaml.safe_load(path.read_text())["data"]) >= {"path", "format", "template"}
