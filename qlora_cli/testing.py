"""Builders the test suite, the benchmarks and the tiny-base tools share, so that what is measured is what is tested.

Nothing here runs in `qlora` itself (transformers keeps its `testing_utils` the same way). Heavy libraries are
imported inside the functions, so importing this module costs nothing.

    build_tokenizer   the word-level tokenizer of the tiny demo base, or of any random base
    base_config       a Mistral config from a few shape numbers (Mistral-7B's by default)
    build_base        a random Mistral-shaped base saved in bf16 safetensors, with its tokenizer
    build_adapter     a LoRA adapter folder as `qlora train` writes it, with non-zero weights
    run_in_fresh_process   `python -m module ...` in a new interpreter, its JSON result returned
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import string
import subprocess
import sys
import tempfile
from pathlib import Path

# Words, whitespace runs and single punctuation marks are tokens, except that the single space
# between two words is dropped: it is implied, and the decoder puts it back. Each word thus has a
# single token wherever it appears ("in Paris", "'Paris'", "\"Paris\""), which is what copying needs,
# and sequences are about half as long as with a token per space.
IMPLIED_SPACE = r"(?<=\w) (?=\w)"
TOKEN_PATTERN = r"\w+|\s+|[^\w\s]"
UNK, BOS, EOS = "<unk>", "<s>", "</s>"  # Mistral's special tokens and ids 0, 1, 2
TOKENIZER_MAX_LENGTH = 256  # the tiny demo base's context
# ChatML's turn markers (ids 3 and 4 with `chat`): control tokens in the vocabulary from the start, so the
# pretrained base has embeddings for them and generation can stop at IM_END.
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ChatML, as Qwen writes it, behind the base's BOS: every message is one framed turn, and the generation
# prompt opens the assistant's.
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(IMPLIED_SPACE), behavior="removed"),
            pre_tokenizers.Split(Regex(TOKEN_PATTERN), behavior="isolated"),
        ]
    )


def _decoder():
    from tokenizers import Regex, decoders

    # Mark every token boundary, join, then turn the boundaries between two words back into the
    # space the pre-tokenizer removed; every other boundary joins with nothing.
    return decoders.Sequence(
        [
            decoders.Replace(Regex("$"), "\x01"),
            decoders.Fuse(),
            decoders.Replace(Regex(r"(?<=\w)\x01(?=\w)"), " "),
            decoders.Replace("\x01", ""),
        ]
    )


def build_tokenizer(texts: list[str], vocab_size: int | None = None, chat: bool = False):
    """Word-level tokenizer whose vocabulary is every token of `texts` plus printable ASCII.

    With `vocab_size`, exactly that many tokens: the tokens of `texts` first, then single characters,
    then fillers (`w0`, `w1`, ...), so that a random base of that vocabulary reads those texts as real ids.
    With `chat`, IM_START and IM_END are special tokens (ids 3 and 4) and the chat template is CHATML_TEMPLATE;
    its role names are words of the vocabulary."""
    from tokenizers import AddedToken, Tokenizer, models, processors
    from transformers import PreTrainedTokenizerFast

    pre_tokenizer = _pre_tokenizer()
    pieces = {piece for text in texts for piece, _ in pre_tokenizer.pre_tokenize_str(text)}
    markers = [IM_START, IM_END] if chat else []
    if chat:
        pieces = (pieces - set(markers)) | {"system", "user", "assistant"}
    # Single characters keep unforeseen punctuation and digits out of <unk>.
    characters = {*string.printable.strip(), " ", "\n"}
    if vocab_size is None:
        tokens = [UNK, BOS, EOS, *markers, *sorted(pieces | characters)]
    else:
        tokens = [UNK, BOS, EOS, *markers, *sorted(pieces), *sorted(characters - pieces)]
        fillers = (f"w{number}" for number in range(vocab_size))
        tokens = (tokens + [filler for filler in fillers if filler not in pieces])[:vocab_size]
    vocab = {token: index for index, token in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizer
    core.decoder = _decoder()
    # Matched before pre-tokenization, so "<|im_end|>" is one id rather than five punctuation tokens.
    core.add_special_tokens([AddedToken(marker, special=True, normalized=False) for marker in markers])
    # BOS in front like Mistral; no EOS, since SFT appends it to completions itself.
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=TOKENIZER_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        **({"extra_special_tokens": markers} if chat else {}),
    )
    if chat:
        tokenizer.chat_template = CHATML_TEMPLATE  # save_pretrained writes it to chat_template.jinja
    return tokenizer


# A Mistral-shaped model small enough to train in minutes on two CPU cores (base_config keywords); widths
# are multiples of 32 because bitsandbytes packs 4-bit CPU weights in 32-row blocks.
SMALL_SHAPE = {
    "vocab": 1024,
    "hidden": 256,
    "intermediate": 640,
    "layers": 4,
    "heads": 4,
    "kv_heads": 2,
    "max_positions": 1024,
}


def base_config(
    *,
    layers: int = 32,
    hidden: int = 4096,
    intermediate: int = 14336,
    vocab: int = 32000,
    heads: int = 32,
    kv_heads: int = 8,
    max_positions: int | None = None,
):
    """A Mistral config of the given shape; the defaults are Mistral-7B's (7.24 B parameters)."""
    from transformers import MistralConfig

    positions = {} if max_positions is None else {"max_position_embeddings": max_positions}
    return MistralConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **positions,
    )


def check_prompts() -> list[str]:
    """The prompts `qlora merge` checks its output on: a random base's tokenizer knows their words."""
    from qlora_cli.merge import VERIFY_INSTRUCTIONS
    from qlora_cli.prompts import render_prompt

    return [render_prompt(text) for text in VERIFY_INSTRUCTIONS]


def save_base_config(folder: Path, *, max_length: int | None = None, **shape) -> dict:
    """config.json and a tokenizer for the shape, without weights: enough for `qlora plan`."""
    config = base_config(**shape)
    tokenizer = build_tokenizer(check_prompts(), vocab_size=config.vocab_size)
    tokenizer.pad_token = tokenizer.unk_token  # qlora's load_tokenizer picks the same, and every caller shares it
    if max_length is not None:
        tokenizer.model_max_length = max_length
    Path(folder).mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return config.to_dict()


def build_base(
    folder: Path, *, shards: int = 1, seed: int = 0, device: str = "cpu", max_length: int | None = None, **shape
):
    """A random Mistral-shaped model (see `base_config` for the shape's keywords) saved in bf16 as at least
    `shards` safetensors files beside its config and tokenizer; returns the model (bf16, on `device`)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    save_base_config(folder, max_length=max_length, **shape)
    torch.manual_seed(seed)
    # Initialising 7B parameters takes seconds on a GPU and minutes on CPU cores.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(base_config(**shape), dtype=torch.bfloat16)
    if shards > 1:
        total_bytes = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
        # save_pretrained closes a shard once it would pass the limit, so a limit a little under an even
        # split always yields at least `shards` files.
        model.save_pretrained(folder, max_shard_size=int(total_bytes / shards * 0.9))
    else:
        model.save_pretrained(folder)
    return model


def build_adapter(
    model,
    base_dir: Path,
    adapter_dir: Path,
    *,
    name: str = "synthetic",
    r: int = 8,
    alpha: float = 16.0,
    compute_dtype: str = "bfloat16",
    seed: int = 0,
    use_dora: bool = False,
    use_rslora: bool = False,
) -> Path:
    """A LoRA adapter folder as `qlora train` writes it, with random non-zero lora_B so merging changes weights
    (and, with DoRA, magnitudes moved off the base's row norms). Takes `model` (from build_base) and wraps it
    with peft in place."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from qlora_cli import adapters
    from qlora_cli.model import base_model_record
    from qlora_cli.recipe import DataSection, LoraSection, ModelSection, Recipe, TrainSection

    torch.manual_seed(seed + 1)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
        use_dora=use_dora,
        use_rslora=use_rslora,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for parameter_name, parameter in peft_model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.normal_(0.0, 0.02)  # the size of the base weights' own init: a clearly visible update
            if "lora_magnitude_vector" in parameter_name:
                parameter.mul_(1.0 + 0.2 * torch.rand_like(parameter))
    peft_model.save_pretrained(adapter_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(adapter_dir)
    section = ModelSection(id=str(Path(base_dir).resolve()), compute_dtype=compute_dtype, device="cpu")
    recipe = Recipe(
        model=section,
        lora=LoraSection(name=name, r=r, alpha=alpha, dropout=0.0, use_dora=use_dora, use_rslora=use_rslora),
        data=DataSection(path="synthetic.jsonl"),
        train=TrainSection(output_dir=f"runs/{name}"),
    )
    (adapter_dir / "recipe.yaml").write_text(recipe.to_yaml())
    adapters.write_metadata(
        adapter_dir,
        name=name,
        base=base_model_record(section, Path(base_dir)),
        template="alpaca",
        task="forward",
        lora={"r": r, "alpha": alpha, "target_modules": "all-linear", "use_dora": use_dora, "use_rslora": use_rslora},
        metrics={},
    )
    return adapter_dir


def run_in_fresh_process(module: str, *args: str, environment: dict[str, str] | None = None) -> dict:
    """Run `python -m module ARGS... RESULT` in a new interpreter, so that its peak memory, caches and imports
    are its own, and return the JSON it wrote to RESULT (its last argument). `environment` adds variables.
    Raises RuntimeError with the end of its output when it fails."""
    top = importlib.import_module(module.partition(".")[0])
    # The module's top-level folder (benchmarks/, tools/ or qlora_cli/) is importable whatever the cwd.
    root = str(Path(top.__file__).resolve().parent.parent)
    env = {
        **os.environ,
        **(environment or {}),
        "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    }
    with tempfile.TemporaryDirectory(prefix="qlora-fresh-process-") as scratch:
        result = Path(scratch) / "result.json"
        command = [sys.executable, "-m", module, *args, str(result)]
        completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        if completed.returncode != 0 or not result.is_file():
            output = (completed.stdout + completed.stderr)[-6000:]
            raise RuntimeError(f"python -m {module} {' '.join(args)} failed (exit {completed.returncode}):\n{output}")
        return json.loads(result.read_text())
