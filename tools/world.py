"""Deterministic toy worlds for the tiny demo: two fine-tuning tasks and a pretraining corpus.

Two target tasks, each an alpaca-format dataset the adapter is trained and evaluated on:

* ``sql``  — instruction: an English question, input: a one-table schema, output: one SQLite query.
* ``json`` — instruction: "Extract the order as JSON.", input: an order sentence, output: compact JSON.

The pretraining corpus (``copy_texts``, then ``pretraining_texts``) gives the tiny base model the
skills an adapter cannot add to frozen weights — copying arbitrary words, the alpaca frame, SQL and
JSON syntax — but over *made-up* tables, keys and values, in another phrasing and another layout.
Hence the base alone fails the target tasks and the adapter is what teaches them. Every word a
target row contains is still drilled by the task-free copy exercises, so each has a trained
embedding the model knows how to copy.

Pure Python and seeded ``random.Random`` only: the same call always yields the same rows.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sqlite3
import zlib
from pathlib import Path

from qlora_cli.prompts import render_prompt

# Table name -> column name -> pool of values. str pools are TEXT columns, int pools INTEGER ones.
Tables = dict[str, dict[str, list]]

_CITIES = ["Paris", "Oslo", "Madrid", "Lisbon", "Berlin", "Rome", "Vienna", "Prague", "Dublin", "Athens"]
_PEOPLE = ["Alice", "Bruno", "Carla", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kenji", "Lena"]

# Tables of the sql task (train and test). Pretraining SQL uses made-up tables and values instead.
# Numbers stay below 1000, the range pretraining SQL copies numbers from.
TARGET_TABLES: Tables = {
    "employees": {
        "name": _PEOPLE,
        "dept": ["sales", "legal", "finance", "support", "research", "marketing", "design", "logistics"],
        "salary": list(range(30, 100, 5)),  # thousands
        "city": _CITIES,
    },
    "books": {
        "title": ["Dune", "Emma", "Ulysses", "Beloved", "Matilda", "Dracula", "Rebecca", "Walden"],
        "author": ["Herbert", "Austen", "Joyce", "Morrison", "Dahl", "Stoker", "Shelley", "Orwell"],
        "genre": ["fantasy", "romance", "horror", "classic", "mystery", "poetry", "satire"],
        "pages": list(range(120, 820, 40)),
        "copies": list(range(50, 1000, 50)),
    },
    "movies": {
        "title": ["Alien", "Heat", "Jaws", "Rocky", "Psycho", "Vertigo", "Amadeus", "Inception"],
        "director": ["Scott", "Mann", "Spielberg", "Hitchcock", "Forman", "Nolan", "Cameron", "Kubrick"],
        "genre": ["drama", "thriller", "comedy", "western", "action", "musical"],
        "rating": list(range(1, 11)),
        "minutes": list(range(80, 200, 5)),
    },
    "pets": {
        "name": ["Rex", "Luna", "Milo", "Bella", "Coco", "Max", "Nala", "Oscar", "Pepper", "Ziggy"],
        "species": ["cat", "dog", "parrot", "rabbit", "hamster", "turtle", "ferret", "goldfish"],
        "owner": _PEOPLE,
        "age": list(range(1, 16)),
    },
    "flights": {
        "code": ["AF12", "BA34", "LH56", "KL78", "IB90", "AZ21", "OS43", "SK65"],
        "origin": _CITIES,
        "destination": _CITIES,
        "seats": list(range(50, 310, 10)),
        "price": list(range(100, 950, 50)),
    },
    "hotels": {
        "name": ["Ritz", "Savoy", "Plaza", "Hilton", "Astoria", "Regent", "Imperial", "Majestic"],
        "city": _CITIES,
        "chain": ["Marriott", "Accor", "Hyatt", "Radisson", "Kempinski"],
        "stars": list(range(1, 6)),
        "rooms": list(range(20, 420, 20)),
    },
    "cars": {
        "model": ["Golf", "Civic", "Corolla", "Clio", "Panda", "Focus", "Octavia", "Yaris"],
        "brand": ["Volkswagen", "Honda", "Toyota", "Renault", "Fiat", "Ford", "Skoda"],
        "color": ["red", "blue", "black", "white", "silver", "green", "yellow"],
        "price": list(range(100, 1000, 25)),
        "seats": list(range(2, 10)),
    },
    "songs": {
        "title": ["Yesterday", "Imagine", "Hallelujah", "Respect", "Jolene", "Wonderwall", "Creep", "Halo"],
        "artist": ["Beatles", "Lennon", "Cohen", "Franklin", "Parton", "Oasis", "Radiohead", "Prince"],
        "album": ["Help", "Revolver", "Legend", "Thriller", "Abbey", "Nevermind"],
        "plays": list(range(100, 1000, 20)),
        "seconds": list(range(120, 430, 10)),
    },
}


def _made_up_words(n: int, seed: int) -> list[str]:
    """`n` pronounceable nonsense words ("talo", "vemiru"): pretraining SQL and JSON use these, so
    the base cannot memorise its tables and values and must learn to copy them from the prompt."""
    rng = random.Random(seed)
    onsets, vowels = "bdfgklmnprstvz", "aeiou"
    taken = {w.lower() for table in TARGET_TABLES.values() for pool in table.values() for w in map(str, pool)}
    words: list[str] = []
    while len(words) < n:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))
        if word not in taken and word not in words:
            words.append(word)
    return words


MADE_UP_WORDS = _made_up_words(400, seed=7)

# One SQL shape per kind; both phrasing families below map onto these same shapes.
SQL_SHAPES = {
    "select_eq": "SELECT {c} FROM {t} WHERE {w} = '{v}';",
    "count_eq": "SELECT COUNT(*) FROM {t} WHERE {w} = '{v}';",
    "select_gt": "SELECT {c} FROM {t} WHERE {n} > {x};",
    "select_lt": "SELECT {c} FROM {t} WHERE {n} < {x};",
    "agg": "SELECT {fn}({n}) FROM {t};",
    "agg_eq": "SELECT {fn}({n}) FROM {t} WHERE {w} = '{v}';",
    "top": "SELECT {c} FROM {t} ORDER BY {n} DESC LIMIT 1;",
    "bottom": "SELECT {c} FROM {t} ORDER BY {n} ASC LIMIT 1;",
    "group_count": "SELECT {w}, COUNT(*) FROM {t} GROUP BY {w};",
    "distinct": "SELECT DISTINCT {w} FROM {t};",
}

# The sql task's English questions: full sentences in the alpaca frame.
TARGET_PHRASINGS = {
    "select_eq": ["Show the {c} of {t} whose {w} is {v}.", "What is the {c} of the {t} whose {w} is {v}?"],
    "count_eq": ["How many {t} have {w} {v}?", "How many {t} have a {w} of {v}?"],
    "select_gt": ["List the {c} of {t} with {n} above {x}."],
    "select_lt": ["List the {c} of {t} with {n} below {x}."],
    "agg": ["What is the {agg} {n} of {t}?", "Give the {agg} {n} across all {t}."],
    "agg_eq": ["What is the {agg} {n} of {t} whose {w} is {v}?"],
    "top": ["Which {c} has the highest {n} in {t}?"],
    "bottom": ["Which {c} has the lowest {n} in {t}?"],
    "group_count": ["How many {t} are there for each {w}?"],
    "distinct": ["List the distinct {w} of {t}."],
}
TARGET_AGGS = {"AVG": "average", "MAX": "highest", "MIN": "lowest", "SUM": "total"}

# Pretraining's terse request style, a different phrasing family for the same SQL shapes.
PRETRAIN_PHRASINGS = {
    "select_eq": ["find {c} in {t} where {w} equals {v}", "get {c} from {t} for {w} {v}"],
    "count_eq": ["count {t} where {w} equals {v}", "number of {t} with {w} {v}"],
    "select_gt": ["get {c} from {t} where {n} exceeds {x}"],
    "select_lt": ["get {c} from {t} where {n} is under {x}"],
    "agg": ["compute the {agg} of {n} in {t}"],
    "agg_eq": ["compute the {agg} of {n} in {t} where {w} equals {v}"],
    "top": ["top {c} in {t} by {n}"],
    "bottom": ["bottom {c} in {t} by {n}"],
    "group_count": ["group {t} by {w} and count"],
    "distinct": ["unique {w} in {t}"],
}
PRETRAIN_AGGS = {"AVG": "mean", "MAX": "maximum", "MIN": "minimum", "SUM": "sum"}

# The last pretraining stage adds synonyms: more terse shapes that use the task's key words
# ("highest", "below", "each") among others, because a pretrained language model knows what those
# words mean. What the base still never sees is the task itself — its questions, its frame, its
# tables. Without this the adapter must also learn which of six look-alike words picks MAX, MIN,
# ASC or "<", and in a few CPU minutes it does not: it guesses AVG and DESC.
SYNONYM_PHRASINGS = {
    "select_gt": ["{c} from {t} for {n} above {x}", "get {c} from {t} with {n} above {x}"],
    "select_lt": ["{c} from {t} for {n} below {x}", "get {c} from {t} with {n} below {x}"],
    "agg": ["the {agg} {n} in {t}"],
    "agg_eq": ["the {agg} {n} in {t} for {w} {v}"],
    "top": ["{c} in {t} with the highest {n}"],
    "bottom": ["{c} in {t} with the lowest {n}"],
    "group_count": ["count {t} for each {w}"],
    "distinct": ["distinct {w} in {t}"],
}
SYNONYM_AGGS = {
    "AVG": ["mean", "average"],
    "MAX": ["maximum", "highest"],
    "MIN": ["minimum", "lowest"],
    "SUM": ["sum", "total"],
}

# json task: order sentences -> {"item", "qty", "color"?, "city"}; every value is copied verbatim.
ORDER_INSTRUCTIONS = ["Extract the order as JSON.", "Turn the order into JSON."]
ORDER_TEMPLATES = [
    "Please send {qty} {goods} to {city}.",
    "I need {qty} {goods} delivered to {city}.",
    "Ship {qty} {goods} to {city} please.",
    "Could you bring {qty} {goods} to our office in {city}?",
    "{city} wants {qty} {goods}.",
    "Order {qty} {goods} for the {city} store.",
]
ORDER_ITEMS = [
    "lamps",
    "chairs",
    "desks",
    "mugs",
    "pens",
    "bottles",
    "boxes",
    "plates",
    "towels",
    "candles",
    "pillows",
    "clocks",
    "baskets",
    "jars",
    "brushes",
    "hats",
    "gloves",
    "scarves",
    "bags",
    "rugs",
]
ORDER_COLORS = ["red", "blue", "green", "black", "white", "yellow", "orange", "purple", "grey", "pink"]
ORDER_CITIES = _CITIES + ["Warsaw", "Zurich", "Helsinki", "Tokyo", "Lima", "Cairo", "Denver", "Austin", "Boston"]
ORDER_QTYS = list(range(1, 61))

# Pretraining JSON drill: "key value ..." records with made-up keys and values.
RECORD_INSTRUCTION = "Convert the record to JSON."

# Copy drills: generic, task-free exercises over every word of `all_words`.
COPY_INSTRUCTIONS = ["Repeat the input.", "Copy the input exactly."]
QUOTE_INSTRUCTION = "Quote each word of the input."
LIST_INSTRUCTION = "Write the words of the input as a JSON list."
ECHO_PREFIX = "Repeat after me:"

SPLITS = ("train", "test")
# Rows written by `write_datasets`: (task, split) -> (rows, seed).
DATASET_SIZES = {
    ("sql", "train"): (1500, 1),
    ("sql", "test"): (100, 2),
    ("json", "train"): (1500, 3),
    ("json", "test"): (100, 4),
}
TEST_SHARE = 8  # one question in TEST_SHARE belongs to the test split


def _split_of(instruction: str, input: str) -> str:
    # A stable hash of the question decides its split, so train and test can never share one,
    # whatever seeds or sizes the callers pick.
    return "test" if zlib.crc32(f"{instruction}\n{input}".encode()) % TEST_SHARE == 0 else "train"


def _schema(table: str, columns: dict[str, list]) -> str:
    return f"table {table} ({', '.join(columns)})"


def check_sql(schema_columns: dict[str, list], table: str, query: str) -> None:
    """Raise sqlite3.Error unless `query` runs against an empty in-memory copy of the table."""
    ddl = ", ".join(f"{c} {'INTEGER' if isinstance(pool[0], int) else 'TEXT'}" for c, pool in schema_columns.items())
    with sqlite3.connect(":memory:") as db:
        db.execute(f"CREATE TABLE {table} ({ddl})")
        db.execute(query).fetchall()


def _one_of(rng: random.Random, words: str | list[str]) -> str:
    # A single word draws nothing, so the target datasets stay what they were before synonyms.
    return words if isinstance(words, str) else rng.choice(words)


def _sql_example(rng: random.Random, tables: Tables, phrasings: dict, aggs: dict) -> tuple[str, str, str]:
    """(question, schema, query) for a random table and SQL shape."""
    t = rng.choice(sorted(tables))
    columns = tables[t]
    text_cols = [c for c, pool in columns.items() if isinstance(pool[0], str)]
    num_cols = [c for c, pool in columns.items() if isinstance(pool[0], int)]
    kind = rng.choice(sorted(phrasings))
    w = rng.choice(text_cols)
    n = rng.choice(num_cols)
    fn = rng.choice(sorted(aggs))
    slots = {
        "t": t,
        "w": w,
        "n": n,
        "fn": fn,
        "agg": _one_of(rng, aggs[fn]),
        "v": rng.choice(columns[w]),
        "x": rng.choice(columns[n]),
        # The selected column must differ from the one the question filters or sorts on.
        "c": rng.choice([c for c in columns if c not in (w, n)]),
    }
    question = rng.choice(phrasings[kind]).format(**slots)
    query = SQL_SHAPES[kind].format(**slots)
    check_sql(columns, t, query)
    return question, _schema(t, columns), query


def _unique_rows(make, split: str, n: int, seed: int) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        row = make(rng)
        key = (row["instruction"], row["input"])
        if key in seen or _split_of(*key) != split:
            continue
        seen.add(key)
        rows.append(row)
    return rows


def sql_rows(split: str, n: int, seed: int) -> list[dict]:
    """`n` distinct sql-task rows of `split`: question -> SQLite query over the target tables."""

    def make(rng: random.Random) -> dict:
        question, schema, query = _sql_example(rng, TARGET_TABLES, TARGET_PHRASINGS, TARGET_AGGS)
        return {"instruction": question, "input": schema, "output": query}

    return _unique_rows(make, split, n, seed)


def _order_example(rng: random.Random) -> dict:
    item, qty, city = rng.choice(ORDER_ITEMS), rng.choice(ORDER_QTYS), rng.choice(ORDER_CITIES)
    color = rng.choice(ORDER_COLORS) if rng.random() < 0.5 else None
    goods = f"{color} {item}" if color else item
    sentence = rng.choice(ORDER_TEMPLATES).format(qty=qty, goods=goods, city=city)
    fields = {"item": item, "qty": qty, **({"color": color} if color else {}), "city": city}
    return {"instruction": rng.choice(ORDER_INSTRUCTIONS), "input": sentence, "output": _compact_json(fields)}


def json_rows(split: str, n: int, seed: int) -> list[dict]:
    """`n` distinct json-task rows of `split`: order sentence -> compact JSON of its fields."""
    return _unique_rows(_order_example, split, n, seed)


def _compact_json(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def all_words() -> list[str]:
    """The copy drills' alphabet: every word of the task datasets, plus the made-up words.

    Task words come straight from the rows, phrasing words ("above", "lowest") included: a word
    the pretraining never shows keeps a random embedding that the softmax drags towards every
    other unseen word, and an adapter cannot tell "above" from "below" if the base cannot.
    """
    words = set(MADE_UP_WORDS)
    for rows in dataset_rows().values():
        for row in rows:
            words.update(re.findall(r"\w+", " ".join(row.values())))
    return sorted(words)


def _copy_drill(rng: random.Random, words: list[str], framed: bool) -> str:
    picked = [rng.choice(words) for _ in range(rng.randint(3, 12))]
    text = " ".join(picked)
    quoted = ", ".join(f"'{w}'" for w in picked)
    listed = _compact_json(picked)
    if not framed:
        return rng.choice([f"copy: {text}\n{text}", f"quote: {text}\n{quoted}", f"list: {text}\n{listed}"])
    form = rng.randrange(4)
    if form == 0:  # the content sits in the instruction, as the sql task's question does
        return render_prompt(f"{ECHO_PREFIX} {text}") + text
    if form == 1:
        return render_prompt(QUOTE_INSTRUCTION, text) + quoted
    if form == 2:
        return render_prompt(LIST_INSTRUCTION, text) + listed
    return render_prompt(rng.choice(COPY_INSTRUCTIONS), text) + text


def _twice_drill(rng: random.Random, words: list[str]) -> str:
    # Saying each word twice is the easiest copy there is (look one token back): it trains the
    # copying output maps in a few steps, before copy drills need them.
    picked = [rng.choice(words) for _ in range(rng.randint(3, 12))]
    return "twice: " + " ".join(f"{w} {w}" for w in picked)


def _made_up_value(rng: random.Random):
    return rng.randrange(1, 1000) if rng.random() < 0.3 else rng.choice(MADE_UP_WORDS)


def _record_drill(rng: random.Random, framed: bool) -> str:
    record = {key: _made_up_value(rng) for key in rng.sample(MADE_UP_WORDS, rng.randint(2, 4))}
    pairs = " ".join(f"{k} {v}" for k, v in record.items())
    if not framed:
        return f"record: {pairs}\nJSON: {_compact_json(record)}"
    return render_prompt(RECORD_INSTRUCTION, pairs) + _compact_json(record)


def _made_up_table(rng: random.Random) -> Tables:
    name, *columns = rng.sample(MADE_UP_WORDS, rng.randint(5, 6))
    numeric = set(rng.sample(columns, rng.randint(1, 2)))
    return {
        name: {
            c: sorted(rng.sample(range(1, 1000), 6)) if c in numeric else rng.sample(MADE_UP_WORDS, 6) for c in columns
        }
    }


def _sql_request(rng: random.Random, synonyms: bool = False) -> str:
    phrasings, aggs = PRETRAIN_PHRASINGS, PRETRAIN_AGGS
    if synonyms:
        phrasings = {kind: shapes + SYNONYM_PHRASINGS.get(kind, []) for kind, shapes in phrasings.items()}
        aggs = SYNONYM_AGGS
    request, schema, query = _sql_example(rng, _made_up_table(rng), phrasings, aggs)
    return f"{schema}\nrequest: {request}\nSQL: {query}"


def copy_texts(n: int, seed: int) -> list[str]:
    """`n` copy drills (no special tokens), the first stage of pretraining.

    Copying has to exist before the model can learn to copy *into* SQL and JSON; in a mixed
    corpus it does not emerge within a few CPU minutes, on its own it takes a few hundred steps.
    """
    rng = random.Random(seed)
    words = all_words()
    texts = []
    for _ in range(n):
        # Unframed only: the alpaca preamble would be most of the tokens and teach nothing about copying.
        texts.append(_twice_drill(rng, words) if rng.random() < 0.5 else _copy_drill(rng, words, framed=False))
    return texts


def pretraining_texts(n: int, seed: int, synonyms: bool = False) -> list[str]:
    """`n` texts (no special tokens) for the second stage: SQL and JSON over made-up tables and
    records, with copy drills kept in the mix so the copying learnt first is not forgotten.

    Most texts are terse, unframed drills: the alpaca preamble is ~70 tokens that a model learns
    in a few dozen steps, so framing every drill would spend most of a CPU budget on it. A share
    of copy and record drills comes in the alpaca frame, so the base knows the frame, its
    instruction and input slots, and that a response follows. SQL appears only unframed, in a
    `schema / request / SQL` layout the sql task never uses. With `synonyms`, the requests also
    come in the shapes of SYNONYM_PHRASINGS (the last stage).
    """
    rng = random.Random(seed)
    words = all_words()
    texts = []
    for _ in range(n):
        r = rng.random()
        if r < 0.1:
            texts.append(_copy_drill(rng, words, framed=True))
        elif r < 0.2:
            texts.append(_record_drill(rng, framed=True))
        elif r < 0.3:
            texts.append(_twice_drill(rng, words))
        elif r < 0.4:
            texts.append(_copy_drill(rng, words, framed=False))
        elif r < 0.8:
            texts.append(_sql_request(rng, synonyms))
        else:
            texts.append(_record_drill(rng, framed=False))
    return texts


def dataset_rows() -> dict[tuple[str, str], list[dict]]:
    """The demo datasets exactly as `write_datasets` writes them."""
    make = {"sql": sql_rows, "json": json_rows}
    return {(task, split): make[task](split, n, seed) for (task, split), (n, seed) in DATASET_SIZES.items()}


def write_datasets(out_dir: str | Path) -> dict[tuple[str, str], Path]:
    """Write <out_dir>/{sql,json}/{train,test}.jsonl; returns the paths written."""
    paths = {}
    for (task, split), rows in dataset_rows().items():
        path = Path(out_dir) / task / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        paths[(task, split)] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the tiny demo's sql and json datasets.")
    parser.add_argument("--out", default="recipes/tiny", help="folder that receives sql/ and json/")
    args = parser.parse_args(argv)
    for (task, split), path in write_datasets(args.out).items():
        count = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"{task}/{split}: {count} rows -> {path}")


if __name__ == "__main__":
    main()
