"""The tiny demo's world (tools/world.py) and its tokenizer: what the shipped data and base promise."""

import json
import re

import pytest
from helpers import TINY

from qlora_cli.testing import CHATML_TEMPLATE, IM_END, IM_START, build_tokenizer
from tools import world


def test_the_chat_tokenizer_has_turn_markers_as_control_tokens_and_chatml_with_the_bos():
    tokenizer = build_tokenizer(["Add 2 lamps."], chat=True)
    assert tokenizer.convert_tokens_to_ids([IM_START, IM_END]) == [3, 4]
    assert {3, 4} <= set(tokenizer.all_special_ids)
    assert tokenizer.chat_template == CHATML_TEMPLATE
    conversation = [
        {"role": "system", "content": "Add 2 lamps."},
        {"role": "user", "content": "Add 2 lamps."},
        {"role": "assistant", "content": "lamps"},
    ]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=False)
    assert text == (
        "<s><|im_start|>system\nAdd 2 lamps.<|im_end|>\n<|im_start|>user\nAdd 2 lamps.<|im_end|>\n"
        "<|im_start|>assistant\nlamps<|im_end|>\n"
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    # Each role name and the newline after it are one token: the frame costs three tokens a turn.
    assert tokenizer.convert_ids_to_tokens(ids[:4]) == ["<s>", IM_START, "system", "\n"]
    for role in ("user", "assistant"):
        assert len(tokenizer(role, add_special_tokens=False)["input_ids"]) == 1


def test_a_plain_tokenizer_has_no_chat_template():
    assert build_tokenizer(["a b"]).chat_template is None


def _replay(messages: list[dict]) -> None:
    """Every assistant turn of an orders conversation states the order its user turns built."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(users) == len(answers) and 2 <= len(users) <= 4
    for answer in answers:
        assert re.fullmatch(r"Your order: \d+ \w+(, \d+ \w+)*\.", answer), answer
    # The first answer holds what the first message asked for, in its order.
    asked = re.findall(r"(\d+) (\w+)", users[0])
    assert answers[0] == world.order_summary({item: int(qty) for qty, item in asked})


def test_orders_conversations_are_messages_with_a_checkable_order_after_every_turn():
    rows = world.orders_rows("train", 200, seed=5)
    assert rows == world.orders_rows("train", 200, seed=5)
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] in ("system", "user") and roles[-1] == "assistant"
        _replay(row["messages"])
    assert any(row["messages"][0]["role"] == "system" for row in rows)


def test_orders_splits_share_no_conversation():
    def users(rows):
        return {json.dumps([m["content"] for m in row["messages"] if m["role"] == "user"]) for row in rows}

    assert not users(world.orders_rows("train", 300, seed=5)) & users(world.orders_rows("test", 100, seed=6))


def test_varied_sql_questions_run_and_never_repeat_a_test_question():
    train = world.sql_rows("train", 200, seed=1, varied_share=1.0)
    test = [json.loads(line) for line in (TINY / "sql" / "test.jsonl").read_text().splitlines()]
    assert not {(r["instruction"], r["input"]) for r in train} & {(r["instruction"], r["input"]) for r in test}
    # Far more sentence shapes than the ten templates of the test split: count them with the values blanked.
    shapes = {re.sub(r"\d+|'[^']*'", "_", row["instruction"].lower()) for row in train}
    assert len(shapes) > 150


def test_the_test_split_keeps_the_original_phrasings():
    templates = [
        re.escape(phrasing).replace(r"\{agg\}", r"\w+").replace(r"\{x\}", r"\d+")
        for phrasings in world.TARGET_PHRASINGS.values()
        for phrasing in phrasings
    ]
    pattern = re.compile("|".join(re.sub(r"\\\{\w\\\}", r"\\w+", t) for t in templates))
    for line in (TINY / "sql" / "test.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert pattern.fullmatch(row["instruction"]), row["instruction"]


def test_every_sql_table_value_and_common_question_word_has_a_token_in_the_shipped_base():
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(TINY / "base")
    if tokenizer.chat_template is None:
        pytest.fail("the shipped tiny base has no chat template: python -m tools.pretrain")
    words = {str(v) for table in world.TARGET_TABLES.values() for pool in table.values() for v in pool}
    words |= set(world.COMMON_WORDS.split()) | {w.capitalize() for w in world.COMMON_WORDS.split()}
    unknown = [w for w in sorted(words) if tokenizer.convert_tokens_to_ids(w) == tokenizer.unk_token_id]
    assert not unknown


def test_the_shipped_orders_data_is_what_the_generator_writes():
    for split, (n, seed) in (("train", world.DATASET_SIZES[("orders", "train")]), ("test", (100, 6))):
        shipped = [json.loads(line) for line in (TINY / "orders" / f"{split}.jsonl").read_text().splitlines()]
        assert len(shipped) == n
        assert shipped[:20] == world.orders_rows(split, 20, seed=seed)
