"""Mistral's real tokenizers, built offline from the files the mistral-common wheel ships.

- sentencepiece-v1: `tokenizer.model.v1`, the 32000-piece SentencePiece model of Mistral-7B (v0.1, Instruct-v0.2)
  and Mixtral-8x7B: byte fallback, no normalizer, '▁' for spaces.
- sentencepiece-v3: the 32768-piece model of Mistral-7B-Instruct-v0.3, whose control pieces ([INST], [TOOL_CALLS],
  ...) are special tokens.
- tekken: `tekken_240718.json`, the 131072-token byte-level BPE (tiktoken style) of Mistral-NeMo.

transformers converts each file into a fast tokenizer exactly as it does for a hub repo that ships only the
original file (LlamaTokenizer over `tokenizer.model`; `convert_tekken_tokenizer` for tekken), with the special
tokens of the hub repos: BOS <s> added in front of every encoding, EOS </s>, UNK <unk>, and for tekken PAD <pad>.
The result is saved as tokenizer.json + tokenizer_config.json (in a temp folder kept between sessions, see
`cache_root`) and read back through `qlora_cli.model.load_tokenizer`, the way qlora loads a model's tokenizer (so
SentencePiece models get pad = <unk>, as in training). No network: everything comes from installed wheels.

Its fixtures reach every test module through `pytest_plugins` in tests/conftest.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import pytest

KINDS = ("sentencepiece-v1", "sentencepiece-v3", "tekken")

# File name patterns inside mistral_common/data, newest match wins (the wheel dates its files).
SOURCE_FILES = {
    "sentencepiece-v1": "tokenizer.model.v1",
    "sentencepiece-v3": "*.model.v3",
    "tekken": "tekken_240718.json",
}


def mistral_common_file(kind: str) -> Path:
    try:
        data = Path(str(resources.files("mistral_common") / "data"))
    except ModuleNotFoundError:
        pytest.fail(
            "mistral-common is not installed; the real-tokenizer tests need the dev extra: pip install -e '.[dev]'"
        )
    found = sorted(data.glob(SOURCE_FILES[kind]))
    if not found:
        pytest.fail(
            f"mistral-common {data} ships no {SOURCE_FILES[kind]}; the real-tokenizer tests need a version that does"
        )
    return found[-1]


def build_tokenizer_dir(kind: str, root: Path) -> Path:
    """Convert Mistral's file into `root/kind` (tokenizer.json + tokenizer_config.json), once per root."""
    folder = root / kind
    if (folder / "tokenizer.json").is_file():
        return folder
    source = mistral_common_file(kind)
    staging = root / f".{kind}.{os.getpid()}"  # a session running beside this one builds its own, then one rename wins
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if kind.startswith("sentencepiece"):
        from transformers import LlamaTokenizer

        shutil.copyfile(source, staging / "tokenizer.model")
        # legacy=False is what transformers and the Mistral hub repos use today: text right after a special
        # token gets no extra '▁'; for plain text both agree with SentencePiece itself (tested).
        tokenizer = LlamaTokenizer.from_pretrained(staging, add_bos_token=True, add_eos_token=False, legacy=False)
        (staging / "tokenizer.model").unlink()
    else:
        from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

        tokenizer = convert_tekken_tokenizer(str(source))
        tokenizer.add_bos_token = True  # rebuilds the post-processor: "<s> $A", as in the NeMo hub repo
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(folder)
    except OSError:  # another session finished first: use its copy
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def cache_root() -> Path:
    """A folder under the system temp dir that outlives the session: converting tekken takes ~10 s. Its name
    carries the library versions and this file's text, so a change to either builds afresh."""
    import mistral_common
    import tokenizers
    import transformers

    key = hashlib.sha256(
        "\n".join(
            [Path(__file__).read_text(), transformers.__version__, tokenizers.__version__, mistral_common.__version__]
        ).encode()
    ).hexdigest()[:16]
    root = Path(tempfile.gettempdir()) / "qlora-test-tokenizers" / key
    root.mkdir(parents=True, exist_ok=True)
    return root


_loaded: dict[tuple[Path, str], object] = {}


def load_real_tokenizer(kind: str, root: Path):
    """The tokenizer as qlora loads it; built and loaded once per (root, kind)."""
    key = (root, kind)
    if key not in _loaded:
        from qlora_cli.model import load_tokenizer
        from qlora_cli.recipe import ModelSection

        folder = build_tokenizer_dir(kind, root)
        _loaded[key] = load_tokenizer(folder, ModelSection(id=str(folder)))
    return _loaded[key]


@pytest.fixture(scope="session")
def real_tokenizer_root() -> Path:
    return cache_root()


@pytest.fixture(scope="session", params=KINDS)
def real_tokenizer(request, real_tokenizer_root):
    """One of Mistral's real tokenizers, shared by the session: do not change its settings."""
    return load_real_tokenizer(request.param, real_tokenizer_root)


@pytest.fixture(scope="session")
def sentencepiece_tokenizer(real_tokenizer_root):
    """Mistral-7B's SentencePiece tokenizer alone, for the cases that only SentencePiece shows."""
    return load_real_tokenizer("sentencepiece-v1", real_tokenizer_root)
