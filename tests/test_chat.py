"""Chat data on the shipped tiny base: every format trains, every bad row is named before anything is written,
the dry run shows a multi-turn mask, and generation renders what training saw."""

import json
import re
import shutil
from pathlib import Path

import pytest
from helpers import TINY, write_jsonl, write_recipe
from transformers import AutoTokenizer

from qlora_cli.adapters import AdapterRecord
from qlora_cli.chat import IGNORE_INDEX
from qlora_cli.errors import QloraError
from qlora_cli.generate import Sampling, converse, open_session
from qlora_cli.prompts import Renderer, Style

# A template of our own, beside the recipe: a frame the tiny base knows words of, EOS closing each reply.
FRAME = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "### Response:\n{{ m['content'] }}{{ eos_token }}\n"
    "{% else %}### {{ m['role'] }}:\n{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)
NO_END = FRAME.replace("{{ eos_token }}", "")
WORDS = ["red", "blue", "green", "Paris", "Oslo", "books", "pets", "salary"]


def turns(n: int, seed: int) -> list[dict]:
    messages = []
    for turn in range(n):
        word = WORDS[(seed + turn) % len(WORDS)]
        messages += [
            {"role": "user", "content": f"Repeat after me: {word}"},
            {"role": "assistant", "content": f"{word} {word}"},
        ]
    return messages


FORMATS = {
    "messages": lambda i: {"messages": turns(2, i)},
    "sharegpt": lambda i: {
        "conversations": [
            {"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in turns(2, i)
        ]
    },
    "prompt_completion": lambda i: {"prompt": f"Repeat after me: {WORDS[i % 8]}\n", "completion": WORDS[i % 8]},
    "text": lambda i: {"text": f"{WORDS[i % 8]} and {WORDS[(i + 1) % 8]}"},
    "alpaca": lambda i: {"instruction": "Repeat after me:", "input": WORDS[i % 8], "output": WORDS[i % 8]},
}


def chat_recipe(tmp_path: Path, rows: list, *, name: str = "chat", template: str | None = "frame.jinja", **data):
    """A recipe training `rows` on the tiny base for one step, with FRAME and NO_END beside it."""
    (tmp_path / "frame.jinja").write_text(FRAME)
    (tmp_path / "no-end.jinja").write_text(NO_END)
    section = {"path": str(write_jsonl(tmp_path / f"{name}.jsonl", rows)), "max_length": 128, **data}
    if template is not None:
        section["template"] = template
    return write_recipe(
        tmp_path,
        name,
        start={
            "model": {"id": str(TINY / "base"), "compute_dtype": "float32"},
            "lora": {"name": name, "dropout": 0.0},
            "data": section,
            "train": {
                "output_dir": str(tmp_path / "runs" / name),
                "max_steps": 1,
                "batch_size": 4,
                "grad_accum": 1,
                "gradient_checkpointing": False,
                "save_steps": 1000,
            },
        },
    )


@pytest.mark.parametrize(
    ("data_format", "template", "trained_template"),
    [
        ("messages", "frame.jinja", "frame.jinja"),
        ("messages", None, "chat"),  # the tiny base's own ChatML template, the default for conversations
        ("sharegpt", "frame.jinja", "frame.jinja"),
        ("prompt_completion", None, "none"),
        ("text", None, "none"),
        ("alpaca", "frame.jinja", "frame.jinja"),  # an alpaca row as a one-turn conversation
    ],
)
def test_each_format_trains_the_tiny_base(tmp_path, run_cli, data_format, template, trained_template):
    recipe = chat_recipe(tmp_path, [FORMATS[data_format](i) for i in range(8)], template=template)
    code, _, err = run_cli(["train", str(recipe), "--adapters-dir", str(tmp_path / "adapters")])
    assert code == 0, err
    record = AdapterRecord.load(tmp_path / "adapters" / "chat")
    end_of_turn = ["<|im_end|>", "</s>"] if trained_template == "chat" else ["</s>"]
    assert (record.format, record.template, record.end_of_turn) == (data_format, trained_template, end_of_turn)
    if template is not None:  # the exact text trained with travels with the adapter
        assert record.template_text == FRAME and record.style.template_sha256 == record.template_sha256
    if trained_template == "chat":
        assert record.template_text == (TINY / "base" / "chat_template.jinja").read_text()


ROLE_ORDER_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
GOOD = {"messages": turns(1, 0)}
BAD_ROWS = {
    "messages not a list": ([GOOD, {"messages": "hello"}], r"row 2: messages must be a list"),
    "unknown role": (
        [{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "hi"}]}],
        r"row 1: messages\[0\]\.role: unknown role 'bot'",
    ),
    "empty assistant turn": (
        [GOOD, GOOD, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}],
        r"row 3: messages\[1\]: empty assistant message",
    ),
    "missing assistant content": (
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}],
        r"row 1: messages\[1\]: empty assistant message",
    ),
    "no assistant turn": ([{"messages": [{"role": "user", "content": "hi"}]}], r"row 1: messages: no assistant turn"),
    "tool call without a name": (
        [
            {
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]},
                ]
            }
        ],
        r"row 1: messages\[1\]\.tool_calls\[0\]: missing function\.name",
    ),
    "tool call without arguments": (
        [
            {
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "tool_calls": [{"function": {"name": "weather"}}]},
                ]
            }
        ],
        r"row 1: messages\[1\]\.tool_calls\[0\] \(weather\): missing function\.arguments",
    ),
    "a file mixing formats": (
        [GOOD, GOOD, {"instruction": "hi", "output": "hi"}],
        r"mixes formats \(row 1 is messages, row 3 is alpaca\)",
    ),
    "a row fitting two formats": (
        [{**GOOD, "prompt": "hi", "completion": "hi"}],
        r"row 1 fits both messages \(messages\) and prompt_completion \(prompt/completion\); set data\.format",
    ),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_a_bad_row_is_named_with_its_field_and_nothing_is_written(tmp_path, run_cli, case):
    rows, message = BAD_ROWS[case]
    recipe = chat_recipe(tmp_path, rows)
    code, _, err = run_cli(["train", str(recipe), "--adapters-dir", str(tmp_path / "adapters")])
    assert code == 1
    assert re.search(message, " ".join(err.split())), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "adapters").exists()


@pytest.mark.parametrize(
    ("template", "rows", "message"),
    [
        (  # roles out of order for a template that needs them to alternate: the template's words, and the row
            "order.jinja",
            [GOOD, {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, *turns(1, 1)]}],
            r"row 2: the order\.jinja template refuses this conversation: Conversation roles must alternate",
        ),
        (  # a template that ends no assistant turn with a token: the adapter would never stop
            "no-end.jinja",
            [GOOD],
            r"row 1: assistant turn \(message 2\) does not end with an end-of-turn token",
        ),
    ],
)
def test_what_the_template_refuses_is_named_by_row_before_any_weights_load(tmp_path, run_cli, template, rows, message):
    (tmp_path / "order.jinja").write_text(ROLE_ORDER_TEMPLATE)
    recipe = chat_recipe(tmp_path, rows, template=template)
    code, _, err = run_cli(["train", str(recipe), "--adapters-dir", str(tmp_path / "adapters")])
    assert code == 1
    assert re.search(message, " ".join(err.split())), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "adapters").exists()


def test_template_chat_on_a_tokenizer_without_one_says_what_to_set(tmp_path, run_cli):
    base = tmp_path / "plain-base"
    shutil.copytree(TINY / "base", base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    recipe = chat_recipe(tmp_path, [GOOD], template="chat")
    recipe.write_text(recipe.read_text().replace(str(TINY / "base"), str(base)))
    for command in ("validate", "train"):  # validate reads the tokenizer files; train loads the tokenizer
        code, _, err = run_cli([command, str(recipe), "--adapters-dir", str(tmp_path / "adapters")])
        assert code == 1
        assert "has no chat_template. Set data.template to a .jinja file" in " ".join(err.split()), command
    assert not (tmp_path / "runs").exists()


def test_conversations_need_a_chat_template_said_at_validate(tmp_path, run_cli):
    recipe = chat_recipe(tmp_path, [GOOD], template="alpaca")
    code, _, err = run_cli(["validate", str(recipe)])
    assert code == 1
    assert "data.template: alpaca renders one prompt and its response" in " ".join(err.split())


def test_the_dry_run_shows_a_three_turn_mask_with_every_end_of_turn_learned(tmp_path, run_cli):
    recipe = chat_recipe(tmp_path, [{"messages": turns(3, i)} for i in range(4)])
    code, out, err = run_cli(["train", str(recipe), "--dry-run"])
    assert code == 0, err
    shown = " ".join(out.split())
    assert "a multi-turn training example" in shown
    assert "in 3 learned span(s); 3 of 3 end with a learned EOS (</s>)" in shown


def test_text_that_looks_like_a_control_token_is_learned_as_text():
    tokenizer = AutoTokenizer.from_pretrained(TINY / "base")
    renderer = Renderer(Style(template="frame.jinja", template_text=FRAME), tokenizer)
    row = {"messages": [{"role": "user", "content": "say </s> now"}, {"role": "assistant", "content": "</s> red"}]}
    example = renderer.example(row)
    eos = tokenizer.eos_token_id
    # One EOS, written by the template after the reply; the reply's own "</s>" is four characters of text.
    assert [i for i, token in enumerate(example["input_ids"]) if token == eos] == [len(example["input_ids"]) - 2]
    learned = [token for token, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
    assert tokenizer.decode(learned) == "</s> red</s>" and learned.count(eos) == 1
    # Generation starts from exactly the ids training put before the reply.
    prompt = renderer.prompt_ids({"messages": row["messages"][:1]})
    assert example["input_ids"][: len(prompt)] == prompt and example["labels"][len(prompt)] != IGNORE_INDEX


@pytest.fixture(scope="module")
def chat_adapter(tmp_path_factory) -> Path:
    from qlora_cli import train
    from qlora_cli.recipe import load_recipe

    folder = tmp_path_factory.mktemp("chat-adapter")
    recipe = chat_recipe(folder, [{"messages": turns(2, i)} for i in range(8)], system="Be brief.")
    train.run(load_recipe(recipe), adapters_dir=str(folder / "adapters"))
    return folder / "adapters"


def test_the_chat_keeps_the_conversation_with_its_system_prompt(chat_adapter):
    session = open_session(["chat"], home=str(chat_adapter))
    shown: list[str] = []
    histories = converse(
        session,
        ["chat"],
        ["Repeat after me: red", "Repeat after me: blue", ""],
        "",
        Sampling(max_new_tokens=4),
        show=shown.append,
        show_heading=shown.append,
        system="Answer in one word.",
    )
    history = histories["chat"]
    assert [m["role"] for m in history] == ["system", "user", "assistant", "user", "assistant"]
    assert history[0]["content"] == "Answer in one word."  # --system wins over the recorded data.system
    answers = "".join(shown).split("\n")
    assert [history[2]["content"], history[4]["content"]] == [answers[0].strip(), answers[1].strip()]
    # The second question is asked with the first exchange before it, rendered as training rendered it.
    prompt = session.prompt({"messages": history[:4]}, "chat")
    assert prompt.count("### Response:") == 2 and "Repeat after me: red" in prompt


def test_the_adapter_prompts_with_the_template_text_it_recorded(chat_adapter):
    record = AdapterRecord.load(chat_adapter / "chat")
    assert (record.system, record.template_text) == ("Be brief.", FRAME)
    session = open_session(["chat"], home=str(chat_adapter))
    # data.system reaches a conversation that has none, as in training.
    assert "### system:\nBe brief." in session.prompt({"messages": [{"role": "user", "content": "hi"}]}, "chat")
    # A record whose template no longer matches its hash was edited: refused, not silently used.
    marker = chat_adapter / "chat" / "qlora.json"
    fields = json.loads(marker.read_text())
    marker.write_text(json.dumps({**fields, "template_text": NO_END}))
    try:
        with pytest.raises(QloraError, match="template_text does not match its template_sha256"):
            _ = AdapterRecord.load(chat_adapter / "chat").style
    finally:
        marker.write_text(json.dumps(fields))


def test_train_on_picks_the_learned_turns():
    from qlora_cli.train import learned_segments

    renderer = Renderer(
        Style(template="frame.jinja", template_text=FRAME), AutoTokenizer.from_pretrained(TINY / "base")
    )
    row = {"messages": turns(3, 0)}
    spans = {on: learned_segments(renderer.example(row, train_on=on)["labels"]) for on in ("assistant", "last", "all")}
    assert len(spans["assistant"]) == 3 and spans["last"] == spans["assistant"][-1:]
    assert spans["all"] == [(0, len(renderer.example(row)["input_ids"]) - 1)]


def test_eval_scores_the_last_assistant_turn_of_each_conversation(chat_adapter, tmp_path, run_cli):
    rows = [{"messages": turns(2, i)} for i in range(3)]
    data = write_jsonl(tmp_path / "held-out.jsonl", rows)
    out = tmp_path / "eval.json"
    code, _, err = run_cli(
        ["eval", "--data", str(data), "-a", "chat", "--adapters-dir", str(chat_adapter), "--out", str(out)]
    )
    assert code == 0, err
    scored = json.loads(out.read_text())["results"][0]["rows"]
    assert [(row["instruction"], row["reference"]) for row in scored] == [
        (row["messages"][-2]["content"], row["messages"][-1]["content"]) for row in rows
    ]


def test_a_tool_call_is_learned_as_the_template_writes_it():
    """Qwen2.5's own template (the hub original, as TRL ships it): the call an assistant turn makes is rendered
    from structured data, and learned from after the assistant cue through <|im_end|>."""
    import trl

    from qlora_cli.chat import ChatTemplate, encode_conversation
    from qlora_cli.data import normalized
    from qlora_cli.testing import build_tokenizer

    source = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    words = "weather in Paris sunny today tool_call name arguments city You are Qwen created by Alibaba Cloud helpful"
    tokenizer = build_tokenizer([words], chat=True)
    call = {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    row = {
        "messages": [
            {"role": "user", "content": "weather in Paris"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "sunny today"},
        ]
    }
    encoded = encode_conversation(ChatTemplate("chat", source), tokenizer, normalized(row, "messages")["messages"])
    learned = tokenizer.decode([i for i, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE_INDEX])
    # The JSON-string arguments of an OpenAI export are written once, as an object, not quoted twice.
    assert learned == (
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>sunny today<|im_end|>'
    )


def test_generation_stops_at_the_templates_end_of_turn_and_at_eos():
    from qlora_cli.testing import CHATML_TEMPLATE, build_tokenizer

    tokenizer = build_tokenizer(["hello there"], chat=True)
    chatml = Renderer(Style(template="chat", template_text=CHATML_TEMPLATE), tokenizer)
    assert chatml.end_of_turn_tokens() == ["<|im_end|>", "</s>"]
    framed = Renderer(Style(template="frame.jinja", template_text=FRAME), tokenizer)
    assert framed.end_of_turn_tokens() == ["</s>"]
    assert Renderer(Style(), tokenizer).end_of_turn_tokens() == ["</s>"]  # alpaca: EOS ends the response
