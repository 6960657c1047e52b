"""Deterministic toy worlds for the tiny demo: three fine-tuning tasks and a pretraining corpus.

Three target tasks, each a dataset the adapter is trained and evaluated on:

* ``sql``    — alpaca rows; instruction: an English question, input: a one-table schema, output: one
  SQLite query. The training split also phrases its questions freely (`_varied_question`).
* ``json``   — alpaca rows; instruction: "Extract the order as JSON.", input: an order sentence,
  output: compact JSON.
* ``orders`` — `messages` conversations: an assistant keeps track of an order across follow-up turns.

The pretraining corpus (``copy_texts``, then ``pretraining_texts``) gives the tiny base model the
skills an adapter cannot add to frozen weights — copying arbitrary words, the alpaca and chat frames,
carrying words across turns, SQL and JSON syntax — but over *made-up* tables, keys and values, in another phrasing and another layout.
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
_MADE_UP = set(MADE_UP_WORDS)

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

# The sql task's training split also asks its questions the way users type them: questions and
# commands, synonyms, other word orders, lower-case starts, no final mark. The phrasing is built from
# parts (below) rather than picked from a few sentences, so the adapter learns what each part asks of
# the query instead of recognising whole sentence shapes. The test split keeps TARGET_PHRASINGS only.
VARIED_SHARE = 0.65  # share of the sql training rows phrased by the grammar below

# Table -> (one row's noun, the column that names a row).
TABLE_NOUNS = {
    "employees": ("employee", "name"),
    "books": ("book", "title"),
    "movies": ("movie", "title"),
    "pets": ("pet", "name"),
    "flights": ("flight", "code"),
    "hotels": ("hotel", "name"),
    "cars": ("car", "model"),
    "songs": ("song", "title"),
}
# Column -> (words for one value, words for several); a column not listed is its own word, plural too.
COLUMN_WORDS = {
    "name": (["name"], ["names"]),
    "dept": (["dept", "department"], ["depts", "departments"]),
    "salary": (["salary", "pay"], ["salaries"]),
    "city": (["city"], ["cities"]),
    "title": (["title"], ["titles"]),
    "author": (["author", "writer"], ["authors", "writers"]),
    "genre": (["genre"], ["genres"]),
    "director": (["director"], ["directors"]),
    "rating": (["rating", "score"], ["ratings", "scores"]),
    "owner": (["owner"], ["owners"]),
    "age": (["age"], ["ages"]),
    "code": (["code", "number"], ["codes", "numbers"]),
    "origin": (["origin", "departure city"], ["origins"]),
    "destination": (["destination"], ["destinations"]),
    "price": (["price", "cost"], ["prices"]),
    "chain": (["chain"], ["chains"]),
    "model": (["model"], ["models"]),
    "brand": (["brand", "maker"], ["brands", "makers"]),
    "color": (["color", "colour"], ["colors", "colours"]),
    "artist": (["artist", "singer"], ["artists", "singers"]),
    "album": (["album"], ["albums"]),
}
# How people point at rows by a value, after the noun ("books by Austen"); GENERIC_FILTERS fit any column.
GENERIC_FILTERS = [
    "whose {w} is {v}",
    "with {w} {v}",
    "where {w} is {v}",
    "where {w} = {v}",
    "that have {w} {v}",
    "with a {w} of {v}",
    "having {w} {v}",
    "where the {w} equals {v}",
    "whose {w} equals {v}",
    "with the {w} {v}",
]
NATURAL_FILTERS = {
    ("employees", "name"): ["named {v}", "called {v}"],
    ("employees", "dept"): ["in the {v} department", "in {v}", "working in {v}", "from the {v} team"],
    ("employees", "city"): ["in {v}", "based in {v}", "working in {v}", "located in {v}", "who work in {v}"],
    ("books", "title"): ["titled {v}", "called {v}"],
    ("books", "author"): ["by {v}", "written by {v}", "that {v} wrote"],
    ("books", "genre"): ["in the {v} genre", "of the {v} genre", "in {v}"],
    ("movies", "title"): ["titled {v}", "called {v}"],
    ("movies", "director"): ["by {v}", "directed by {v}", "made by {v}"],
    ("movies", "genre"): ["in the {v} genre", "of the {v} genre", "of genre {v}"],
    ("pets", "name"): ["named {v}", "called {v}"],
    ("pets", "species"): ["that are a {v}", "of species {v}", "of the {v} species", "that are {vs}"],
    ("pets", "owner"): ["owned by {v}", "belonging to {v}", "that {v} owns", "of {v}"],
    ("flights", "code"): ["with code {v}", "numbered {v}", "with the code {v}"],
    ("flights", "origin"): ["from {v}", "leaving {v}", "departing from {v}", "that leave from {v}", "out of {v}"],
    ("flights", "destination"): ["to {v}", "going to {v}", "arriving in {v}", "bound for {v}", "that fly to {v}"],
    ("hotels", "name"): ["named {v}", "called {v}"],
    ("hotels", "city"): ["in {v}", "located in {v}", "based in {v}"],
    ("hotels", "chain"): ["of the {v} chain", "in the {v} chain", "run by {v}", "belonging to {v}"],
    ("cars", "model"): ["named {v}", "of model {v}"],
    ("cars", "brand"): ["made by {v}", "from {v}", "built by {v}", "of brand {v}"],
    ("cars", "color"): ["painted {v}", "that are {v}", "in {v}", "colored {v}"],
    ("songs", "title"): ["titled {v}", "called {v}"],
    ("songs", "artist"): ["by {v}", "performed by {v}", "sung by {v}", "recorded by {v}"],
    ("songs", "album"): ["on the album {v}", "from the album {v}", "on {v}", "from {v}"],
}
# A value that can stand before the plural noun ("horror books", "red cars", "rabbits").
VALUE_NOUNS = {
    ("books", "genre"): "{v} books",
    ("books", "author"): "{v} books",
    ("movies", "genre"): "{v} movies",
    ("movies", "director"): "{v} movies",
    ("pets", "species"): "{vs}",
    ("cars", "color"): "{v} cars",
    ("cars", "brand"): "{v} cars",
    ("songs", "artist"): "{v} songs",
    ("hotels", "chain"): "{v} hotels",
    ("employees", "dept"): "{v} employees",
}
SPECIES_PLURALS = {"goldfish": "goldfish"}  # the rest take an "s"
# Questions about one named row, in the verbs people use: (table, asked column) -> questions about {v}.
ROW_QUESTIONS = {
    ("books", "author"): ["who wrote {v}", "who is the author of {v}"],
    ("books", "pages"): ["how many pages does {v} have", "how long is {v} in pages"],
    ("books", "genre"): ["what genre is {v}", "what kind of book is {v}"],
    ("movies", "director"): ["who directed {v}", "who made the movie {v}"],
    ("movies", "minutes"): ["how long is {v} in minutes", "how many minutes does {v} last"],
    ("movies", "rating"): ["how is {v} rated", "what rating does {v} have"],
    ("pets", "owner"): ["who owns {v}", "whose pet is {v}"],
    ("pets", "species"): ["what kind of animal is {v}", "what species is {v}"],
    ("pets", "age"): ["how old is {v}"],
    ("flights", "destination"): ["where does flight {v} go", "where does flight {v} fly to"],
    ("flights", "origin"): ["where does flight {v} leave from", "where does flight {v} depart from"],
    ("flights", "price"): ["how much does flight {v} cost"],
    ("flights", "seats"): ["how many seats does flight {v} have"],
    ("hotels", "city"): ["where is the {v}", "which city is the {v} in"],
    ("hotels", "stars"): ["how many stars does the {v} have"],
    ("hotels", "rooms"): ["how many rooms does the {v} have"],
    ("employees", "city"): ["where does {v} work", "which city does {v} work in"],
    ("employees", "dept"): ["which department is {v} in", "what department does {v} work in"],
    ("employees", "salary"): ["how much does {v} earn", "what does {v} earn"],
    ("cars", "brand"): ["which brand makes the {v}", "who makes the {v}"],
    ("cars", "price"): ["how much does the {v} cost"],
    ("cars", "color"): ["what color is the {v}"],
    ("songs", "artist"): ["who sang {v}", "who performs {v}"],
    ("songs", "album"): ["which album is {v} on", "what album is {v} from"],
    ("songs", "plays"): ["how many times was {v} played"],
}
GREATER = ["above", "over", "greater than", "more than", "higher than", "larger than", "bigger than", "exceeding"]
SMALLER = ["below", "under", "less than", "lower than", "smaller than", "beneath"]
COUNTABLE = {"pages", "copies", "seats", "rooms", "stars", "plays", "minutes", "seconds"}
# Comparisons said with the column's own adjective or verb: column -> (greater ones, smaller ones).
NATURAL_COMPARISONS = {
    "age": (["older than {x}", "over {x} years old"], ["younger than {x}", "under {x} years old"]),
    "minutes": (["longer than {x} minutes", "running over {x} minutes"], ["shorter than {x} minutes"]),
    "seconds": (["longer than {x} seconds"], ["shorter than {x} seconds"]),
    "pages": (["longer than {x} pages"], ["shorter than {x} pages"]),
    "price": (
        ["costing more than {x}", "that cost more than {x}", "more expensive than {x}", "priced above {x}"],
        ["costing less than {x}", "that cost less than {x}", "cheaper than {x}", "priced below {x}"],
    ),
    "salary": (
        ["earning more than {x}", "who earn more than {x}", "paid more than {x}", "making over {x}"],
        ["earning less than {x}", "who earn less than {x}", "paid less than {x}"],
    ),
    "rating": (
        ["rated above {x}", "rated higher than {x}", "rated over {x}"],
        ["rated below {x}", "rated lower than {x}"],
    ),
    "plays": (["played more than {x} times"], ["played fewer than {x} times", "played less than {x} times"]),
}
MOST = ["highest", "largest", "biggest", "greatest", "maximum", "top", "most"]
LEAST = ["lowest", "smallest", "least", "minimum", "fewest"]
# The adjective that ranks rows of a table by a column: (table, column) -> (most, least).
SUPERLATIVES = {
    ("pets", "age"): ("oldest", "youngest"),
    ("books", "pages"): ("longest", "shortest"),
    ("movies", "minutes"): ("longest", "shortest"),
    ("songs", "seconds"): ("longest", "shortest"),
    ("flights", "price"): ("most expensive", "cheapest"),
    ("cars", "price"): ("most expensive", "cheapest"),
    ("employees", "salary"): ("best paid", "lowest paid"),
    ("movies", "rating"): ("best rated", "worst rated"),
    ("songs", "plays"): ("most played", "least played"),
    ("hotels", "rooms"): ("largest", "smallest"),
}
VARIED_AGGS = {
    "AVG": ["average", "mean"],
    "MAX": ["highest", "maximum", "largest", "biggest", "greatest", "top"],
    "MIN": ["lowest", "minimum", "smallest", "least"],
    "SUM": ["total", "combined", "overall"],
}
AGG_NOUNS = {"AVG": ["average", "mean"], "MAX": ["maximum", "max"], "MIN": ["minimum", "min"], "SUM": ["sum", "total"]}
EACH = ["per", "for each", "by", "for every", "in each", "grouped by", "broken down by"]
DIFFERENT = ["distinct", "different", "unique"]
COMMANDS = [
    "show",
    "list",
    "give",
    "get",
    "find",
    "return",
    "display",
    "fetch",
    "show me",
    "give me",
    "get me",
    "tell me",
    "I want",
    "I need",
    "I would like",
    "please show",
    "please list",
    "please give me",
    "can you show",
    "could you give me",
    "can you find",
    "can you list",
    "could you tell me",
]
IN_TABLE = ["of", "in", "among", "across", "for", "from", "over"]

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

# orders task: multi-turn conversations in OpenAI `messages` form. The user orders, then adds items,
# changes a quantity or removes an item; every assistant turn restates the whole order in one form,
# "Your order: 2 lamps, 3 mugs.", items in the order they were first asked for.
ORDERS_QTYS = list(range(1, 13))
ORDERS_SYSTEMS = [
    "You take orders for a shop.",
    "You are a helpful shop assistant. Keep track of the order.",
    "Confirm the full order after every message.",
]
ORDERS_OPENINGS = [
    "I'd like {goods}.",
    "Hi, I want to order {goods}.",
    "Can I get {goods}?",
    "I want {goods}, please.",
    "Please order {goods} for me.",
    "{goods}, please.",
    "hello, could I have {goods}",
]
ORDERS_ADDS = [
    "Add {qty} {item}.",
    "Also {qty} {item}, please.",
    "And {qty} {item} too.",
    "Can you add {qty} {item}?",
    "I also need {qty} {item}.",
    "plus {qty} {item}",
]
ORDERS_CHANGES = [
    "Make that {qty} {item}.",
    "Change the {item} to {qty}.",
    "Actually, I want {qty} {item} instead.",
    "Can you make it {qty} {item}?",
    "Update the {item} to {qty}.",
    "I need {qty} {item}, not {old}.",
]
ORDERS_REMOVALS = [
    "Remove the {item}.",
    "Drop the {item}, please.",
    "No {item} after all.",
    "Cancel the {item}.",
    "Take the {item} off the order.",
    "I don't need the {item} anymore.",
]


def order_summary(order: dict[str, int]) -> str:
    """The one form every assistant turn of the orders task takes; exact match checks it."""
    return "Your order: " + ", ".join(f"{qty} {item}" for item, qty in order.items()) + "."


def _orders_conversation(rng: random.Random) -> dict:
    order: dict[str, int] = {}
    first = rng.sample(ORDER_ITEMS, rng.choice([1, 1, 2]))
    for item in first:
        order[item] = rng.choice(ORDERS_QTYS)
    goods = " and ".join(f"{order[item]} {item}" for item in first)
    messages = [{"role": "system", "content": rng.choice(ORDERS_SYSTEMS)}] if rng.random() < 0.3 else []
    messages += [
        {"role": "user", "content": rng.choice(ORDERS_OPENINGS).format(goods=goods)},
        {"role": "assistant", "content": order_summary(order)},
    ]
    for _ in range(rng.randint(1, 3)):
        moves = ["add"] if len(order) < 4 else []
        moves += ["change"] + (["remove"] if len(order) > 1 else [])
        move = rng.choice(moves)
        if move == "add":
            item, qty = rng.choice([i for i in ORDER_ITEMS if i not in order]), rng.choice(ORDERS_QTYS)
            order[item] = qty
            text = rng.choice(ORDERS_ADDS).format(qty=qty, item=item)
        elif move == "change":
            item = rng.choice(list(order))
            old, qty = order[item], rng.choice([q for q in ORDERS_QTYS if q != order[item]])
            order[item] = qty
            text = rng.choice(ORDERS_CHANGES).format(qty=qty, item=item, old=old)
        else:
            item = rng.choice(list(order))
            del order[item]
            text = rng.choice(ORDERS_REMOVALS).format(item=item)
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": order_summary(order)}]
    return {"messages": messages}


def orders_rows(split: str, n: int, seed: int) -> list[dict]:
    """`n` distinct orders conversations of `split` (2 to 4 user turns each)."""

    def key(row: dict) -> tuple[str, str]:
        return json.dumps([m["content"] for m in row["messages"] if m["role"] == "user"]), "orders"

    return _unique_rows(_orders_conversation, split, n, seed, key)


# The common English words of questions and requests, beyond those the task rows happen to use: a word
# the tokenizer lacks becomes <unk>, so a user's own phrasing must find its words in the vocabulary,
# and the copy drills give each of them a trained embedding.
COMMON_WORDS = """
a about above across after again against all almost along also always am among an and another any anything
are around as ask at away back based be because been before being below beneath best better between big
bigger biggest both bottom break but by can cheap cheaper cheapest choose come could count counts data
day did different display distinct do does doing done down duplicate duplicates each either else end
enough equal equals even ever every exactly except exceeding exceeds fetch few fewer fewest find first for
from full get give given go going good great greater greatest group grouped had has have having he her
here high higher highest him his how i if in include including is it its just kind know large larger
largest last least less let like list long longer longest look low lower lowest made make many max maximum
me mean mean median min minimum more most much must my name need never new no none not nothing now number
of off on once one only or order other our out over overall own per please possible pick print query
rank ranked record records repeat repeated result results return row rows same say see select she should
show single small smaller smallest so some sort sorted sum table tell than that the their them then
there these they thing things this those three through times to too top total two under unique up us
use value values want was way we were what whatever when where whether which while who whole whom whose
why will with within without would yes you your
appear appears belong belongs cost costs earn earns earned fly flies go goes leave leaves live lives long
make makes made own owns owned play plays played run runs running sing sings sang write writes wrote
written work works worked time title type kind
""".lower()

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
    ("orders", "train"): (2000, 5),
    ("orders", "test"): (100, 6),
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


def _column_word(rng: random.Random, column: str, plural: bool = False) -> str:
    singular, several = COLUMN_WORDS.get(column, ([column], [column]))
    return rng.choice(several if plural else singular)


def _filter_phrase(rng: random.Random, t: str, w: str, v) -> str:
    """A post-modifier that picks the rows whose column `w` holds `v`: "by Austen", "whose genre is poetry"."""
    natural = NATURAL_FILTERS.get((t, w), [])
    shape = rng.choice(natural) if natural and rng.random() < 0.6 else rng.choice(GENERIC_FILTERS)
    return shape.format(w=_column_word(rng, w), v=v, vs=SPECIES_PLURALS.get(v, f"{v}s"))


def _rows_phrase(rng: random.Random, t: str, w: str, v, the: bool = True) -> str:
    """The rows of `t` whose `w` is `v`, as a plural noun phrase: "the books by Austen", "red cars"."""
    if (t, w) in VALUE_NOUNS and rng.random() < 0.35:
        return VALUE_NOUNS[(t, w)].format(v=v, vs=SPECIES_PLURALS.get(v, f"{v}s"))
    article = rng.choice(["the ", ""]) if the else ""
    return f"{article}{t} {_filter_phrase(rng, t, w, v)}"


def _comparison_phrase(rng: random.Random, n: str, x, greater: bool) -> str:
    natural = NATURAL_COMPARISONS.get(n, ([], []))[0 if greater else 1]
    if natural and rng.random() < 0.4:
        return rng.choice(natural).format(x=x)
    word = rng.choice(GREATER if greater else SMALLER)
    if n in COUNTABLE and rng.random() < 0.3:
        more = rng.choice(["more than", "over"] if greater else ["fewer than", "less than", "under"])
        return f"{rng.choice(['with', 'having'])} {more} {x} {n}"
    column = _column_word(rng, n)
    return rng.choice([f"with {column} {word} {x}", f"whose {column} is {word} {x}", f"where {column} is {word} {x}"])


def _ask(rng: random.Random, noun_phrase: str, plural: bool) -> str:
    """A request for `noun_phrase`: a command, a question, or the bare phrase."""
    r = rng.random()
    if r < 0.45:
        return f"{rng.choice(COMMANDS)} {noun_phrase}"
    if r < 0.85:
        opener = rng.choice(["what are", "which are"] if plural else ["what is", "what's"])
        return f"{opener} {noun_phrase}"
    return noun_phrase


def _surface(rng: random.Random, text: str) -> str:
    """Capitals and final marks as people type them: often neither."""
    if rng.random() < 0.05:
        text = f"{text} please"
    if rng.random() < 0.55 and text.split()[0] not in _MADE_UP:  # a made-up word has no capitalised token
        text = text[0].upper() + text[1:]
    question = text.split()[0].lower() in {"what", "what's", "which", "who", "how", "where", "can", "could", "whose"}
    mark = rng.random()
    if mark < 0.5:
        text += "?" if question else "."
    elif mark < 0.55:
        text += "?"
    return text


def _varied_question(rng: random.Random, kind: str, t: str, slots: dict) -> tuple[str, dict]:
    """A freely phrased question for an SQL shape; returns it with the slots, which a few phrasings adjust
    (a question about one named row picks the row's naming column and the column it asks about)."""
    c, w, n, v, x = slots["c"], slots["w"], slots["n"], slots["v"], slots["x"]
    noun, key = TABLE_NOUNS.get(t, (t, None))
    table_word = rng.choice([t, f"the {t}", f"all {t}", f"all the {t}"])
    if kind == "select_eq":
        asked = [(table, column) for table, column in ROW_QUESTIONS if table == t]
        if key and asked and rng.random() < 0.3:
            _, c = rng.choice(asked)
            value = rng.choice(TARGET_TABLES[t][key])
            slots = {**slots, "c": c, "w": key, "v": value}
            return rng.choice(ROW_QUESTIONS[(t, c)]).format(v=value), slots
        if key and w == key and rng.random() < 0.5:
            target = rng.choice(
                [f"{noun} {v}", f"the {noun} {v}", f"{v}", f"the {noun} {_filter_phrase(rng, t, w, v)}"]
            )
            phrase = f"the {_column_word(rng, c)} of {target}"
            return _ask(rng, phrase, plural=False), slots
        plural = rng.random() < 0.5
        phrase = f"the {_column_word(rng, c, plural)} of {_rows_phrase(rng, t, w, v)}"
        if rng.random() < 0.2:
            return (
                f"which {_column_word(rng, c, plural)} {'do' if plural else 'does'} {_rows_phrase(rng, t, w, v)} have",
                slots,
            )
        return _ask(rng, phrase, plural), slots
    if kind == "count_eq":
        rows = _rows_phrase(rng, t, w, v, the=False)
        return rng.choice(
            [
                f"how many {rows} are there",
                f"how many {rows}",
                f"how many {t} have {_column_word(rng, w)} {v}",
                f"{rng.choice(['count', 'count the'])} {rows}",
                f"{rng.choice(['number of', 'the number of', 'the count of'])} {rows}",
                f"what is the number of {rows}",
                f"tell me how many {rows} there are",
                f"{rng.choice(COMMANDS)} the number of {rows}",
            ]
        ), slots
    if kind in ("select_gt", "select_lt"):
        rows = f"{rng.choice(['', 'the '])}{t} {_comparison_phrase(rng, n, x, kind == 'select_gt')}"
        columns = _column_word(rng, c, plural=True)
        r = rng.random()
        if r < 0.15:
            word = rng.choice(GREATER if kind == "select_gt" else SMALLER)
            return f"which {t} have {_column_word(rng, n)} {word} {x}? give their {columns}", slots
        if r < 0.3:
            return (
                f"{rows}: {rng.choice(['just', 'only'])} the {columns}"
                if rng.random() < 0.5
                else f"{columns} of {rows}",
                slots,
            )
        return _ask(rng, f"the {columns} of {rows}", plural=True), slots
    if kind in ("agg", "agg_eq"):
        fn = slots["fn"]
        rows = _rows_phrase(rng, t, w, v) if kind == "agg_eq" else table_word
        column = _column_word(rng, n)
        superlative = SUPERLATIVES.get((t, n))
        r = rng.random()
        if superlative and fn in ("MAX", "MIN") and kind == "agg" and r < 0.3:
            adjective = superlative[0 if fn == "MAX" else 1]
            return _ask(rng, f"the {column} of the {adjective} {noun}", plural=False), slots
        if r < 0.55:
            phrase = f"the {rng.choice(VARIED_AGGS[fn])} {column} {rng.choice(IN_TABLE)} {rows}"
        elif r < 0.8:
            phrase = (
                f"the {rng.choice(AGG_NOUNS[fn])} of {rng.choice(['', 'the '])}{column} {rng.choice(IN_TABLE)} {rows}"
            )
        elif fn == "SUM":
            return f"{rng.choice(['add up', 'sum', 'sum up'])} the {_column_word(rng, n, True)} of {rows}", slots
        elif fn == "AVG" and n in COUNTABLE:
            return f"how many {n} do {rows} have on average", slots
        else:
            phrase = f"{rows} {rng.choice(VARIED_AGGS[fn])} {column}"
        return _ask(rng, phrase, plural=False), slots
    if kind in ("top", "bottom"):
        most = kind == "top"
        column, asked = _column_word(rng, n), _column_word(rng, c)
        superlative = SUPERLATIVES.get((t, n))
        if superlative and rng.random() < 0.35:
            adjective = superlative[0 if most else 1]
            return rng.choice(
                [
                    _ask(rng, f"the {asked} of the {adjective} {noun}", plural=False),
                    f"which {asked} has the {adjective} {noun}",
                    f"the {adjective} {noun}: {rng.choice(['just', 'only', 'give'])} its {asked}",
                ]
            ), slots
        word = rng.choice(MOST if most else LEAST)
        return rng.choice(
            [
                f"which {asked} has the {word} {column} in {t}",
                f"what {asked} has the {word} {column} among {t}",
                _ask(rng, f"the {asked} of the {noun} with the {word} {column}", plural=False),
                _ask(rng, f"the {asked} with the {word} {column} in {t}", plural=False),
                f"in {t}, which {asked} has the {word} {column}",
                f"{noun} with the {word} {column}, {rng.choice(['just', 'only', 'give'])} the {asked}",
            ]
        ), slots
    if kind == "group_count":
        each, column = rng.choice(EACH), _column_word(rng, w)
        return rng.choice(
            [
                f"how many {t} are there {each} {column}",
                f"how many {t} does each {column} have",
                f"{rng.choice(['count', 'count the'])} {t} {each} {column}",
                _ask(rng, f"the number of {t} {each} {column}", plural=False),
                f"{rng.choice(['for each', 'for every', 'per'])} {column}, how many {t} are there",
                f"number of {t} {each} {column}",
                f"{t} count {each} {column}",
                f"group the {t} by {column} and count them",
            ]
        ), slots
    # distinct
    columns, different = _column_word(rng, w, plural=True), rng.choice(DIFFERENT)
    return rng.choice(
        [
            _ask(rng, f"the {different} {columns} {rng.choice(['of', 'in', 'among'])} {t}", plural=True),
            f"what {columns} are there in {t}",
            f"which {columns} appear in {t}",
            f"{rng.choice(COMMANDS)} each {_column_word(rng, w)} in {t} once",
            f"{rng.choice(COMMANDS)} all the {different} {columns} of the {t}",
            f"{columns} of {t} without duplicates",
        ]
    ), slots


def _varied_sql_example(rng: random.Random, tables: Tables) -> tuple[str, str, str]:
    """(question, schema, query) like `_sql_example`, the question built by `_varied_question`."""
    t = rng.choice(sorted(tables))
    columns = tables[t]
    text_cols = [c for c, pool in columns.items() if isinstance(pool[0], str)]
    num_cols = [c for c, pool in columns.items() if isinstance(pool[0], int)]
    kind = rng.choice(sorted(SQL_SHAPES))
    w, n, fn = rng.choice(text_cols), rng.choice(num_cols), rng.choice(sorted(VARIED_AGGS))
    pool = columns[n]
    # Users ask about any number in a column's range, not only those of its pool.
    x = rng.choice(pool) if rng.random() < 0.7 else rng.randint(min(pool), max(pool))
    slots = {"t": t, "w": w, "n": n, "fn": fn, "v": rng.choice(columns[w]), "x": x}
    slots["c"] = rng.choice([c for c in columns if c not in (w, n)])
    question, slots = _varied_question(rng, kind, t, slots)
    query = SQL_SHAPES[kind].format(**slots)
    check_sql(columns, t, query)
    return _surface(rng, " ".join(question.split())), _schema(t, columns), query


def _unique_rows(make, split: str, n: int, seed: int, key=lambda row: (row["instruction"], row["input"])) -> list[dict]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        row = make(rng)
        identity = key(row)
        if identity in seen or _split_of(*identity) != split:
            continue
        seen.add(identity)
        rows.append(row)
    return rows


def sql_rows(split: str, n: int, seed: int, varied_share: float = 0.0) -> list[dict]:
    """`n` distinct sql-task rows of `split`: question -> SQLite query over the target tables; a
    `varied_share` of them phrased freely (`_varied_question`), the rest in TARGET_PHRASINGS."""

    def make(rng: random.Random) -> dict:
        if varied_share and rng.random() < varied_share:
            question, schema, query = _varied_sql_example(rng, TARGET_TABLES)
        else:
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
    words = set(MADE_UP_WORDS) | set(COMMON_WORDS.split()) | {str(number) for number in range(1001)}
    # Every value, table and column of the sql task, asked about or not, and a capital for each word a
    # question may start with.
    words |= {str(value) for table in TARGET_TABLES.values() for pool in table.values() for value in pool}
    words |= {name for table, columns in TARGET_TABLES.items() for name in (table, *columns)}
    words |= {word.capitalize() for word in words - set(MADE_UP_WORDS) if word.isalpha() and word.islower()}
    for rows in dataset_rows().values():
        for row in rows:
            texts = [m["content"] for m in row["messages"]] if "messages" in row else row.values()
            words.update(re.findall(r"\w+", " ".join(texts)))
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


def render_chat(messages: list[dict]) -> str:
    """A conversation in the tiny base's ChatML frame (`qlora_cli.testing.CHATML_TEMPLATE`), without the
    BOS the template puts first: pretraining packs every text behind its own BOS."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


CHAT_SYSTEMS = ["You repeat words.", "Answer with the words only.", "Keep the tally."]


def _chat_drill(rng: random.Random, words: list[str]) -> str:
    """A made-up conversation in the chat frame: the user gives words, then terse follow-ups change
    them (again, quote, list, add, drop; or a tally of counts), and the assistant answers with the
    current result. It teaches the frame, where a turn ends, and carrying state across turns, over
    words and commands the demo's tasks never use."""
    messages = [{"role": "system", "content": rng.choice(CHAT_SYSTEMS)}] if rng.random() < 0.2 else []
    turns = rng.randint(2, 4)
    if rng.random() < 0.5:
        picked = [rng.choice(words) for _ in range(rng.randint(2, 6))]
        messages += [
            {"role": "user", "content": "repeat: " + " ".join(picked)},
            {"role": "assistant", "content": " ".join(picked)},
        ]
        for _ in range(turns - 1):
            move = rng.choice(["again", "quote", "list", "add", "drop", "twice"])
            if move == "add":
                word = rng.choice(words)
                picked, ask = [*picked, word], f"add {word}"
            elif move == "drop" and len(picked) > 1:
                word = rng.choice(picked)
                picked.remove(word)
                ask = f"drop {word}"
            else:
                move = "again" if move == "drop" else move
                ask = {"again": "again", "quote": "quote them", "list": "as a list", "twice": "twice"}[move]
            answer = {
                "quote": ", ".join(f"'{w}'" for w in picked),
                "list": _compact_json(picked),
                "twice": " ".join(f"{w} {w}" for w in picked),
            }.get(move, " ".join(picked))
            messages += [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
        return render_chat(messages)
    tally: dict[str, int] = {}
    for turn in range(turns):
        keys = list(tally)
        if turn and len(keys) > 1 and rng.random() < 0.25:
            word = rng.choice(keys)
            del tally[word]
            ask = f"drop {word}"
        else:
            word = rng.choice(keys) if keys and rng.random() < 0.35 else rng.choice(MADE_UP_WORDS)
            tally[word] = rng.randint(1, 20)
            ask = f"{'tally: ' if turn == 0 else ''}{word} {tally[word]}"
        answer = ", ".join(f"{w} {n}" for w, n in tally.items())
        messages += [{"role": "user", "content": ask}, {"role": "assistant", "content": answer}]
    return render_chat(messages)


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
    if rng.random() < (0.7 if synonyms else 0.4):
        # The free grammar of the sql task's training questions, over a made-up table: the word
        # knowledge (superlatives, comparisons, "per", "different") without the task's tables. An
        # adapter alone does not learn it in a few CPU minutes: on the base of the terse requests only
        # it got 45% of freshly phrased questions right.
        request, schema, query = _varied_sql_example(rng, _made_up_table(rng))
    else:
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
    instruction and input slots, and that a response follows; a share of made-up conversations
    (`_chat_drill`) teaches the chat frame. SQL appears only unframed, in a `schema / request / SQL`
    layout the sql task never uses; 40% of the requests (70% with `synonyms`, the last stage) are
    phrased in the free grammar of `_varied_question`, and with `synonyms` the others also come in the
    shapes of SYNONYM_PHRASINGS.
    """
    rng = random.Random(seed)
    words = all_words()
    texts = []
    for _ in range(n):
        r = rng.random()
        if r < 0.08:
            texts.append(_copy_drill(rng, words, framed=True))
        elif r < 0.16:
            texts.append(_record_drill(rng, framed=True))
        elif r < 0.24:
            texts.append(_twice_drill(rng, words))
        elif r < 0.32:
            texts.append(_copy_drill(rng, words, framed=False))
        elif r < 0.48:
            texts.append(_chat_drill(rng, words))
        elif r < 0.84:
            texts.append(_sql_request(rng, synonyms))
        else:
            texts.append(_record_drill(rng, framed=False))
    return texts


def dataset_rows() -> dict[tuple[str, str], list[dict]]:
    """The demo datasets exactly as `write_datasets` writes them."""
    make = {
        "sql": lambda split, n, seed: sql_rows(split, n, seed, VARIED_SHARE if split == "train" else 0.0),
        "json": json_rows,
        "orders": orders_rows,
    }
    return {(task, split): make[task](split, n, seed) for (task, split), (n, seed) in DATASET_SIZES.items()}


# The turns that make a right query wrong the way the sql adapter's misses are: the order (lowest/highest),
# the comparison (more/less than) and the aggregate (smallest/largest).
FLIPS = {" DESC": " ASC", " ASC": " DESC", " > ": " < ", " < ": " > ", "MAX(": "MIN(", "MIN(": "MAX("}


def flipped_query(query: str) -> str | None:
    """The query with its first order, comparison or MIN/MAX turned around; None when it has none."""
    found = [(query.find(old), old) for old in FLIPS if old in query]
    if not found:
        return None
    at, old = min(found)
    return query[:at] + FLIPS[old] + query[at + len(old) :]


def sql_preference_rows(rows: list[dict]) -> list[dict]:
    """DPO pairs from sql rows: the right query chosen, the same query turned around rejected."""
    pairs = []
    for row in rows:
        rejected = flipped_query(row["output"])
        if rejected is not None:
            pairs.append(
                {
                    "instruction": row["instruction"],
                    "input": row["input"],
                    "chosen": row["output"],
                    "rejected": rejected,
                }
            )
    return pairs


def write_datasets(out_dir: str | Path) -> dict[tuple[str, str], Path]:
    """Write <out_dir>/{sql,json,orders}/{train,test}.jsonl, and sql/preferences.jsonl and
    sql/test-preferences.jsonl (pairs made from the sql training and held-out rows); returns the paths written."""
    paths = {}
    every = dataset_rows()
    every[("sql", "preferences")] = sql_preference_rows(every[("sql", "train")])
    every[("sql", "test-preferences")] = sql_preference_rows(every[("sql", "test")])
    for (task, split), rows in every.items():
        path = Path(out_dir) / task / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        paths[(task, split)] = path
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the tiny demo's sql, json and orders datasets.")
    parser.add_argument("--out", default="recipes/tiny", help="folder that receives sql/, json/ and orders/")
    args = parser.parse_args(argv)
    for (task, split), path in write_datasets(args.out).items():
        count = sum(1 for _ in path.open(encoding="utf-8"))
        print(f"{task}/{split}: {count} rows -> {path}")


if __name__ == "__main__":
    main()
