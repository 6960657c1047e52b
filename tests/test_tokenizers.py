"""Token boundaries, loss masks and EOS on Mistral's real tokenizers (SentencePiece v1 and v3, tekken BPE).

The toy word-level tokenizer of the tiny demo cannot show what goes wrong on real ones: a SentencePiece
tokenizer puts '▁' in front of text it sees at the start of a string, and a byte-level BPE merges characters
across the prompt/completion boundary. These tests build the real tokenizers offline (tests/real_tokenizers.py).
"""

import json

import pytest
from datasets import Dataset
from real_tokenizers import mistral_common_file
from trl import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from qlora_cli.data import IGNORE_INDEX, build_dataset, tokenize_example
from qlora_cli.prompts import render_example
from qlora_cli.recipe import DataSection

ROWS = [
    {
        "instruction": "How many heads are in the department?",
        "input": "CREATE TABLE head (age INTEGER)",
        "output": "SELECT count(*) FROM head WHERE age > 56",
    },
    {"instruction": "List the names of the singers.", "output": "SELECT name FROM singer ORDER BY name;"},
    {
        "instruction": "Give three tips for staying healthy.",
        "output": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Sleep well.",
    },
    {"instruction": "Translate to French: coffee", "output": "café ☕ — très bon"},
    {"instruction": "Reply in Chinese.", "output": "你好，世界"},
    {"instruction": "Answer with a quote.", "output": ' "Leading space," and  two  spaces.'},
    {"instruction": "Answer on the next line.", "output": "\nSELECT 1;"},  # a byte-level BPE merges ':\n' + '\n'
]


@pytest.fixture
def kind(request, real_tokenizer):
    return request.node.callspec.params["real_tokenizer"]


def examples(rows=ROWS):
    return [render_example(row) for row in rows]


def learned(example: dict) -> list[int]:
    return [label for label in example["labels"] if label != IGNORE_INDEX]


def prompt_ids_as_generate_sees_them(tokenizer, prompt: str) -> list[int]:
    # qlora_cli/generate.py tokenizes prompts this way; training must put exactly these ids before the response.
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def test_tokenizer_has_mistral_special_tokens(real_tokenizer, kind):
    tokenizer = real_tokenizer
    assert tokenizer.is_fast
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    # load_tokenizer gives SentencePiece models pad = <unk> (they have none); tekken has its own <pad>.
    assert tokenizer.pad_token == ("<pad>" if kind == "tekken" else "<unk>")
    assert tokenizer("Hello")["input_ids"][0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in tokenizer("Hello", add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token_id not in tokenizer("Hello")["input_ids"]
    assert len(tokenizer) == {"sentencepiece-v1": 32000, "sentencepiece-v3": 32768, "tekken": 131072}[kind]
    if kind == "sentencepiece-v3":
        assert tokenizer.convert_tokens_to_ids(["[INST]", "[/INST]"]) == [3, 4]
        assert "[INST]" in tokenizer.all_special_tokens


def test_tokenizer_encodes_like_mistral_reference(real_tokenizer, kind):
    """The converted fast tokenizer gives the ids of SentencePiece / mistral-common themselves."""
    # Runs of spaces are left out: SentencePiece splits '  two' as '▁' '▁two', the converted BPE (like the
    # tokenizer.json of the Mistral hub repos) as '▁▁' 'two'. Training and generate share the converted one.
    texts = [example["prompt"] + example["completion"] for example in examples() if "  " not in example["completion"]]
    if kind == "tekken":
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer

        reference = Tekkenizer.from_file(str(mistral_common_file(kind)))
        expected = [reference.encode(text, bos=True, eos=False) for text in texts]
    else:
        import sentencepiece

        reference = sentencepiece.SentencePieceProcessor(model_file=str(mistral_common_file(kind)))
        expected = [[1] + reference.encode(text) for text in texts]
    assert real_tokenizer(texts)["input_ids"] == expected


def test_sentencepiece_completion_starts_without_a_spurious_space(sentencepiece_tokenizer):
    """Defect 6: tokenized alone, 'SELECT' becomes '▁SE LECT'; after the prompt, inference sees 'SELECT'."""
    tokenizer = sentencepiece_tokenizer
    example = render_example({"instruction": "How many singers are there?", "output": "SELECT count(*) FROM singer"})
    tokens = tokenize_example(example["prompt"], example["completion"], tokenizer, 256)
    pieces = tokenizer.convert_ids_to_tokens(learned(tokens))
    assert pieces[0] == "SELECT", pieces
    assert pieces[-1] == "</s>"


def test_learned_tokens_are_those_that_follow_the_prompt(real_tokenizer):
    """The labels are exactly the ids that follow the prompt's own ids in the joint tokenization, and the
    prompt's ids are those generate feeds; prompt + learned ids decode to prompt + completion + EOS."""
    tokenizer = real_tokenizer
    for example in examples():
        prompt, completion = example["prompt"], example["completion"]
        tokens = tokenize_example(prompt, completion, tokenizer, 4096)
        prompt_ids = prompt_ids_as_generate_sees_them(tokenizer, prompt)
        joint_ids = tokenizer(prompt + completion, add_special_tokens=True)["input_ids"]
        assert tokens["input_ids"][: len(prompt_ids)] == prompt_ids
        assert tokens["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
        assert tokens["input_ids"][len(prompt_ids) :] == learned(tokens), "every token after the prompt is learned"
        if joint_ids[: len(prompt_ids)] == prompt_ids:  # no token straddles the boundary (see the next test)
            assert learned(tokens) == joint_ids[len(prompt_ids) :] + [tokenizer.eos_token_id]
        assert tokenizer.decode(tokens["input_ids"], skip_special_tokens=True) == prompt + completion
        assert tokenizer.decode(learned(tokens), skip_special_tokens=True).strip() == completion.strip()
        assert tokens["input_ids"][-1] == tokens["labels"][-1] == tokenizer.eos_token_id


def test_token_merged_across_the_boundary(real_tokenizer, kind):
    """tekken merges the prompt's ':\\n' with a completion's leading '\\n' into one ':\\n\\n' token. Training
    keeps the prompt's own ids (what generate feeds) and learns the completion as it continues from there."""
    tokenizer = real_tokenizer
    example = render_example({"instruction": "Answer on the next line.", "output": "\nSELECT 1;"})
    prompt, completion = example["prompt"], example["completion"]
    prompt_ids = prompt_ids_as_generate_sees_them(tokenizer, prompt)
    joint_ids = tokenizer(prompt + completion)["input_ids"]
    assert (joint_ids[: len(prompt_ids)] != prompt_ids) == (kind == "tekken"), "the case this test is about"
    tokens = tokenize_example(prompt, completion, tokenizer, 256)
    assert tokens["input_ids"][: len(prompt_ids)] == prompt_ids
    assert tokens["labels"] == [IGNORE_INDEX] * len(prompt_ids) + tokens["input_ids"][len(prompt_ids) :]
    assert tokenizer.decode(tokens["input_ids"], skip_special_tokens=True) == prompt + completion
    if kind == "tekken":
        newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
        assert learned(tokens)[:2] == newline + tokenizer("SELECT", add_special_tokens=False)["input_ids"]


def test_unresolvable_merge_learns_every_completion_character(sentencepiece_tokenizer):
    """With SentencePiece, 'a' + 'b' is one token '▁ab': no split keeps the prompt's ids and decodes to the text
    without inventing a '▁'. Then the joint tokens are kept and learning starts where they leave the prompt's."""
    tokenizer = sentencepiece_tokenizer
    tokens = tokenize_example("Translate: hel", "lo world", tokenizer, 256)
    assert tokenizer.decode(tokens["input_ids"], skip_special_tokens=True) == "Translate: hello world"
    assert tokens["input_ids"] == tokenizer("Translate: hello world")["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(learned(tokens), skip_special_tokens=True).endswith("lo world")
    context = [token for token, label in zip(tokens["input_ids"], tokens["labels"]) if label == IGNORE_INDEX]
    assert "Translate: hel".startswith(tokenizer.decode(context, skip_special_tokens=True))


def test_only_completion_and_eos_are_learned_through_build_dataset(real_tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    data = build_dataset(DataSection(path=str(path), max_length=4096), real_tokenizer)
    assert len(data.train) == len(ROWS) and data.dropped == 0
    for row, example in zip(examples(), data.train):
        prompt_length = len(prompt_ids_as_generate_sees_them(real_tokenizer, row["prompt"]))
        labels, input_ids = example["labels"], example["input_ids"]
        assert labels[:prompt_length] == [IGNORE_INDEX] * prompt_length
        assert labels[prompt_length:] == input_ids[prompt_length:]
        assert labels[-1] == real_tokenizer.eos_token_id
        assert labels.count(real_tokenizer.eos_token_id) == 1
        assert real_tokenizer.decode(labels[prompt_length:-1]).strip() == row["completion"].strip()


def test_eos_is_learned_when_pad_is_eos(real_tokenizer):
    """Labels come from our mask, not from pad ids: a collator that pads with EOS keeps every EOS label."""
    tokenizer = real_tokenizer
    batch_examples = [tokenize_example(row["prompt"], row["completion"], tokenizer, 4096) for row in examples()[:3]]
    for example in batch_examples:
        assert example["labels"][-1] == tokenizer.eos_token_id
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.eos_token_id)(batch_examples)
    for row, example in zip(batch["labels"], batch_examples):
        end = len(example["labels"])
        assert row[end - 1] == tokenizer.eos_token_id
        assert (row[end:] == IGNORE_INDEX).all()


def test_truncation_keeps_max_length_tokens_and_their_labels(real_tokenizer, tmp_path):
    tokenizer = real_tokenizer
    row = render_example({"instruction": "Count to fifty.", "output": " ".join(str(n) for n in range(1, 51))})
    full = tokenize_example(row["prompt"], row["completion"], tokenizer, 4096)
    prompt_length = len(prompt_ids_as_generate_sees_them(tokenizer, row["prompt"]))
    cut = tokenize_example(row["prompt"], row["completion"], tokenizer, prompt_length + 5)
    assert len(cut["input_ids"]) == len(cut["labels"]) == prompt_length + 5
    assert cut["input_ids"] == full["input_ids"][: prompt_length + 5]
    assert learned(cut) == learned(full)[:5] and tokenizer.eos_token_id not in learned(cut)
    # An example whose whole response lies beyond max_length teaches nothing: build_dataset drops it.
    long_row = {"instruction": "Count to fifty, one number after another, without skipping any.", "output": "1 2 3"}
    short_row = {"instruction": "Count.", "output": "1 2 3"}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(long_row) + "\n" + json.dumps(short_row) + "\n")
    max_length = len(prompt_ids_as_generate_sees_them(tokenizer, examples([long_row])[0]["prompt"]))
    data = build_dataset(DataSection(path=str(path), max_length=max_length), tokenizer)
    assert (len(data.train), data.dropped) == (1, 1)
    assert learned(data.train[0]) == learned(
        tokenize_example(**examples([short_row])[0], tokenizer=tokenizer, max_length=max_length)
    )


def test_packing_keeps_labels_aligned(real_tokenizer):
    """SFTTrainer packs our tokenized rows (bfd) and flattens them padding-free: each label still sits on the
    token it teaches, the prompt stays masked and every example keeps its EOS."""
    tokenizer = real_tokenizer
    singles = [tokenize_example(row["prompt"], row["completion"], tokenizer, 4096) for row in examples()]
    longest = max(len(example["input_ids"]) for example in singles)
    packed = pack_dataset(Dataset.from_list(singles), seq_length=2 * longest, strategy="bfd")
    assert len(packed) < len(singles), "rows were packed together"
    found = []
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == sum(row["seq_lengths"])
        start = 0
        for length in row["seq_lengths"]:
            found.append(
                {"input_ids": row["input_ids"][start : start + length], "labels": row["labels"][start : start + length]}
            )
            start += length
    assert sorted(map(str, found)) == sorted(map(str, singles))
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(list(packed))
    input_ids, labels, positions = batch["input_ids"][0], batch["labels"][0], batch["position_ids"][0]
    assert int((positions == 0).sum()) == len(singles), "positions restart at each example"
    taught = labels != IGNORE_INDEX
    assert (labels[taught] == input_ids[taught]).all()
    assert int(taught.sum()) == sum(len(learned(example)) for example in singles)
    assert int((labels == tokenizer.eos_token_id).sum()) == len(singles)


def test_dry_run_mask_renders_readable_text(real_tokenizer, kind):
    """`qlora train --dry-run` shows the first example's tokens, dim where masked, green where learned: the
    text must read as the example does, the green part as its completion and EOS."""
    from qlora_cli.train import loss_mask_text

    for row in examples([ROWS[1], ROWS[3]]):  # plain words; a character tekken spreads over two tokens
        example = tokenize_example(row["prompt"], row["completion"], real_tokenizer, 4096)
        text = loss_mask_text(real_tokenizer, example["input_ids"], example["labels"])
        assert text.plain == "<s>" + row["prompt"] + row["completion"] + "</s>"
        green = "".join(text.plain[span.start : span.end] for span in text.spans if "green" in str(span.style))
        assert green == row["completion"] + "</s>"
