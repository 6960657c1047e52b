"""Stage `model`: find the base weights (safetensors only), fingerprint them, load them in 4-bit."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from qlora_cli.errors import QloraError
from qlora_cli.recipe import ModelSection, is_local
from qlora_cli.safetensors_io import read_header

log = logging.getLogger(__name__)

CPU_RECIPE = "recipes/tiny-sql.yaml"
# Only what loading needs: configs, tokenizer files and safetensors. Never pickled *.bin weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
# Mistral's repos (v0.3 on) also carry `consolidated.safetensors`, the same weights in mistral-inference's
# layout: twice the download, and transformers never reads it.
HUB_IGNORED = ["consolidated*.safetensors"]


def bnb_config(section: ModelSection) -> BitsAndBytesConfig | None:
    if not section.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=section.quant_type,
        bnb_4bit_use_double_quant=section.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, section.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, section.quant_storage),
    )


def check_device(section: ModelSection) -> torch.device:
    if section.device == "cuda" and not torch.cuda.is_available():
        raise QloraError(
            f"model.device: cuda, but torch sees no CUDA GPU (torch {torch.__version__}). "
            f"Run on a GPU box, set --set model.device=cpu for a small model, or try the CPU demo: qlora train {CPU_RECIPE}"
        )
    if section.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def resolve_model_dir(section: ModelSection, *, weights: bool = True) -> Path:
    """A local folder as is; a hub id downloaded (safetensors only) into the Hugging Face cache.
    With weights=False only configs and tokenizer files are fetched (dry runs, plans)."""
    if is_local(section.id):
        folder = Path(section.id)
    else:
        from huggingface_hub import snapshot_download

        try:
            # The token comes from HF_TOKEN or `hf auth login`, never from the recipe.
            patterns = HUB_PATTERNS if weights else [p for p in HUB_PATTERNS if p != "*.safetensors"]
            folder = Path(
                snapshot_download(
                    section.id, revision=section.revision, allow_patterns=patterns, ignore_patterns=HUB_IGNORED
                )
            )
        except Exception as error:  # network, auth and missing-repo errors all surface here
            raise QloraError(
                f"model.id: cannot fetch {section.id!r} from the hub: {type(error).__name__}: {error}"
            ) from None
    if not (folder / "config.json").is_file():
        raise QloraError(f"model.id: {folder} has no config.json; is it a transformers model folder?")
    if weights and not weight_files(folder):
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        detail = (
            f" (found pickle weights {', '.join(pickles)}: refused, they can run arbitrary code)" if pickles else ""
        )
        raise QloraError(f"model.id: no .safetensors weights in {folder}{detail}")
    return folder


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files transformers loads: those the shard index names, else every one but
    mistral-inference's `consolidated*` copy of the same weights."""
    index = Path(model_dir) / "model.safetensors.index.json"
    if index.is_file():
        return [Path(model_dir) / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return sorted(path for path in Path(model_dir).glob("*.safetensors") if not path.name.startswith("consolidated"))


def fingerprint_weights(model_dir: Path) -> str:
    """A cheap identity for a set of weights: each shard's header (names, shapes, dtypes, offsets) plus
    16 evenly spaced 64 KiB samples of its data. Same-shaped bases with different weights differ."""
    digest = hashlib.sha256()
    for shard in weight_files(model_dir):
        header = read_header(shard)
        digest.update(header.raw)
        data_bytes = shard.stat().st_size - header.data_start
        with shard.open("rb") as handle:
            for index in range(16):
                handle.seek(header.data_start + data_bytes * index // 16)
                digest.update(handle.read(65536))
    return "sha256:" + digest.hexdigest()[:32]


def load_tokenizer(model_dir: Path, section: ModelSection) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=section.trust_remote_code)
    if tokenizer.eos_token is None:
        raise QloraError(f"model.id: the tokenizer in {model_dir} has no EOS token, so generation could never stop")
    if tokenizer.pad_token is None:
        # Padding only fills batches: labels come from our own loss mask, never from pad ids, so pad = EOS
        # cannot mask the EOS the model must learn (the classic 'generation never stops' bug).
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def sharded_launch() -> bool:
    return any(
        os.environ.get(flag, "").lower() == "true" for flag in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")
    )


def zero3_launch() -> bool:
    return (
        os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
        and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
    )


def attention_implementation(section: ModelSection, *, device: torch.device, packed: bool) -> str:
    """The attention kernel for one load; `packed` means the model will train on padding-free packed rows.

    Packed rows carry their example boundaries only in position_ids. Under SDPA transformers turns them into a dense
    (tokens x tokens) block-diagonal mask: 256 MiB at 8 x 2048 tokens, 1 GiB at 32k, and a mask sends SDPA off its
    flash kernels. Flex attention takes the same boundaries as a BlockMask (0.5 MiB at 8 x 2048: indices of 128-token
    blocks) and skips every block between two examples (`python -m benchmarks.bench_attention`). It is compiled on its
    first call, and once more when the packed length first changes (then with dynamic shapes).
    Generation, merge and padded batches keep SDPA: they have no boundaries to carry. CPU training keeps it too, as
    PyTorch has no flex attention backward on CPU ("FlexAttention does not support backward on CPU").
    """
    choice = section.attn_implementation
    if choice == "auto":
        return "flex_attention" if packed and device.type == "cuda" else "sdpa"
    if choice == "flex_attention" and packed and device.type != "cuda":
        raise QloraError(
            f"model.attn_implementation: flex_attention cannot train on {device.type} (torch {torch.__version__} has its "
            "backward on CUDA only); set model.attn_implementation: auto, which uses sdpa there"
        )
    return choice


def load_model(
    section: ModelSection, model_dir: Path, *, device: torch.device, packed: bool = False
) -> PreTrainedModel:
    """The frozen base: 4-bit through bitsandbytes, or 16-bit when load_in_4bit is false. `packed`: it will train on
    padding-free packed rows, which picks its attention kernel (see attention_implementation)."""
    attention = attention_implementation(section, device=device, packed=packed)
    quantization = bnb_config(section)
    log.info(
        "loading %s %s", section.id, f"in 4-bit {section.quant_type}" if quantization else f"in {section.compute_dtype}"
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=quantization,
        dtype=getattr(torch, section.compute_dtype),
        # Under FSDP or DeepSpeed ZeRO-3 the launcher places (and shards) the weights; transformers
        # refuses a device map there. Otherwise each process loads onto its own GPU.
        device_map={"": device} if device.type == "cuda" and not sharded_launch() else None,
        # `auto` loads with SDPA, which nearly every architecture has, and moves to flex below where it can.
        attn_implementation="sdpa" if section.attn_implementation == "auto" else attention,
        trust_remote_code=section.trust_remote_code,
        use_safetensors=True,
    )
    if section.attn_implementation == "auto" and attention == "flex_attention":
        # flex_attention_forward refuses attention dropout, and some (remote-code) architectures have no flex path.
        if model._supports_flex_attn and not getattr(model.config, "attention_dropout", 0.0):
            model.set_attn_implementation(attention)
        else:
            log.info(
                "%s cannot use flex attention here; packed rows train with sdpa and a dense mask", type(model).__name__
            )
    log.info("attention: %s", model.config._attn_implementation)
    model.config.use_cache = False
    return model


def empty_model(section: ModelSection, model_dir: Path) -> PreTrainedModel:
    """The model's modules on the meta device: shapes and names without loading a single weight."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=section.trust_remote_code)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=section.trust_remote_code)


def base_model_record(section: ModelSection, model_dir: Path) -> dict:
    """What an adapter records about its base, so generate and merge can refuse a different one."""
    config = json.loads((model_dir / "config.json").read_text())
    return {
        "id": section.id,
        "revision": section.revision,
        "fingerprint": fingerprint_weights(model_dir),
        "architecture": (config.get("architectures") or ["?"])[0],
    }
