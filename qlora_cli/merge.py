"""Command `merge`: fold an adapter into its base and write a standalone 16-bit model, shard by shard.

Two choices of base weights to merge into:

- `nf4` (default): the 4-bit weights the adapter was trained on, dequantized. Each linear weight
  that bitsandbytes quantizes at load goes through the same quantize -> dequantize round trip
  (block size, double quantization and data type asked of transformers' own quantizer), so the
  merged model computes what base+adapter computed in training. Merging into the pristine 16-bit
  weights instead adds the quantization error the adapter never saw (peft #2105, unsloth-zoo #810).
- `original`: the 16-bit weights as published, for adapters trained on a 16-bit base.

Memory: shards are merged one after the other, and inside a shard one tensor at a time is read,
merged and written, so the merge needs the adapter plus the largest tensor and its fp32 temporaries,
never the whole model, nor even a whole shard. Verification loads the reference (base+adapter, in
4-bit: what training already fitted) and then the merged model, one after the other; the merged model
is placed within the free GPU memory, then the free RAM, and the rest is offloaded to disk layer by
layer, so verifying never needs more memory than the box has. If it still runs out, the merge is kept,
recorded as unverified, and the user is told so; a merge is never deleted because checking it failed
to fit.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file

from qlora_cli import adapters
from qlora_cli.adapters import AdapterRecord
from qlora_cli.errors import QloraError
from qlora_cli.files import atomic_directory, check_new_output
from qlora_cli.model import base_model_record, check_device, load_model, resolve_model_dir, weight_files
from qlora_cli.prompts import Renderer, Style
from qlora_cli.recipe import ModelSection
from qlora_cli.safetensors_io import TensorReader, TensorWriter, read_header

log = logging.getLogger(__name__)

Source = Literal["nf4", "original"]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INDEX = "model.safetensors.index.json"
PEFT_PREFIX = "base_model.model."  # peft's PeftModelForCausalLM wraps the transformers model twice
# Largest logit difference allowed, relative to the largest reference logit. bf16 keeps 8 significant
# bits (relative rounding 2^-9 = 0.2%) and every layer rounds the merged weights and its activations,
# so a correct bf16 merge drifts from base+adapter with depth: measured 1% on 4 random layers, 2.8% on
# 16. 10% leaves room for deeper models and still catches the mistakes that matter, which miss by far
# more (the nf4 and original merges of that 16-layer model differ by 57%; on 4 layers, a dropped
# adapter misses by 63%, merging into the wrong weights by 21%).
# fp16 keeps 11 bits, so 8x less drift; fp32 reproduces the 4-bit model to ~1e-6.
DEFAULT_TOLERANCE = {torch.bfloat16: 0.1, torch.float16: 0.02, torch.float32: 1e-3}
VERIFY_INSTRUCTIONS = [
    "Give three tips for staying healthy.",
    "Translate the sentence 'the cat sleeps on the mat' into French.",
    "Write a SQL query that counts the rows of the table users.",
]
# peft initialisations that rewrite the base weights themselves: merging into the published base
# would be wrong unless the adapter was first converted back, which plain LoRA checkpoints never need.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


MAGNITUDE = ".lora_magnitude_vector"  # a DoRA adapter's learned row norms, one tensor per adapted module


@dataclass(frozen=True)
class LoraUpdate:
    """W += scaling * B @ A for one base weight; A and B are keys of the adapter's safetensors. With DoRA
    (`magnitude_key`), each row of the sum is then rescaled to its learned norm."""

    a_key: str
    b_key: str
    scaling: float
    magnitude_key: str | None = None


@dataclass(frozen=True)
class Nf4Spec:
    """How bitsandbytes quantizes one weight at 4-bit load."""

    quant_type: str
    blocksize: int
    double_quant: bool


@dataclass(frozen=True)
class Merged:
    """What `merge.run` wrote, and how well the merged model reproduces base+adapter."""

    adapter: str  # as named on the command line
    out: Path
    source: Source
    dtype: str
    shards: int
    lora_updates: int
    verified: bool
    max_logit_diff: float | None  # None when not verified
    relative_logit_diff: float | None  # of the largest reference logit
    unverified_reason: str | None
    seconds: float


def run(
    adapter: str,
    out: Path,
    *,
    source: Source = "nf4",
    dtype: str | None = None,
    base: str | None = None,
    home: str | None = None,
    force: bool = False,
    allow_base_mismatch: bool = False,
    verify: bool = True,
    tolerance: float | None = None,
    verify_memory: dict[int | str, int] | None = None,
) -> Merged:
    """Merge `adapter` into its base and write the result to `out`.

    `tolerance` bounds the largest logit difference against base+adapter, relative to the largest
    reference logit; None picks the default for the dtype compared (DEFAULT_TOLERANCE). `verify_memory`
    caps what the merged model may occupy while verified ({device: bytes}, as accelerate's max_memory);
    None measures what is free."""
    started = time.monotonic()
    out = Path(out)
    adapter_dir = adapters.find_adapter(adapter, home)
    check_new_output(out, "merge output", force=force)
    record = AdapterRecord.load(adapter_dir)
    section = record.base_section(base)
    if source not in ("nf4", "original"):
        raise QloraError(f"--from {source!r}: use nf4 (the 4-bit weights the adapter trained on) or original")
    if source == "nf4" and not section.load_in_4bit:
        raise QloraError(
            f"adapter {adapter_dir.name!r} was trained on a 16-bit base (model.load_in_4bit: false), so there is no "
            "4-bit round trip to reproduce; merge with --from original"
        )
    out_dtype = parse_dtype(dtype or section.compute_dtype)
    model_dir = resolve_model_dir(section)
    base_record = base_model_record(section, model_dir)
    record.check_base(base_record["id"], base_record["fingerprint"], allow_mismatch=allow_base_mismatch)
    base_config = json.loads((model_dir / "config.json").read_text())
    if base_config.get("quantization_config"):
        raise QloraError(
            f"base {section.id} is stored already quantized; merging needs its 16-bit weights (a non-quantized checkpoint)"
        )

    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    check_supported(adapter_config, adapter_dir.name)
    adapter_weights = load_file(adapter_dir / "adapter_model.safetensors")
    shards = shard_files(model_dir)
    base_keys = {key for shard in shards for key in read_header(model_dir / shard).tensors}
    updates = plan_lora_updates(adapter_weights, adapter_config, base_keys, adapter_dir.name)
    nf4_specs = nf4_weight_specs(model_dir, section, base_keys) if source == "nf4" else {}
    compute_dtype = DTYPES[section.compute_dtype]
    log.info(
        "merging %d LoRA updates of %s into %s (%s weights, %d shards) as %s",
        len(updates),
        adapter_dir.name,
        section.id,
        source,
        len(shards),
        dtype_name(out_dtype),
    )

    with atomic_directory(out, force=force) as staging:
        sizes = {}
        for number, shard in enumerate(shards, start=1):
            sizes[shard] = merge_shard(
                model_dir / shard,
                staging / shard,
                adapter_weights,
                updates,
                nf4_specs,
                compute_dtype=compute_dtype,
                out_dtype=out_dtype,
            )
            log.info("shard %d/%d %s written (%.1f MiB)", number, len(shards), shard, sizes[shard] / 2**20)
        del adapter_weights
        write_model_files(model_dir, adapter_dir, staging, section, base_config, out_dtype, sizes)
        if verify:
            check = verify_merge(
                staging, adapter_dir, model_dir, section, source, out_dtype, record.style, tolerance, verify_memory
            )
        else:
            check = {"verified": False, "unverified_reason": "skipped (--no-verify)"}
        adapters.write_metadata(
            staging,
            kind="merged",
            name=out.name,
            source=source,
            adapter=record.name,
            base=base_record,
            dtype=dtype_name(out_dtype),
            lora_updates=len(updates),
            **check,
        )
    log.info("merged model written to %s", out)
    return Merged(
        adapter=adapter,
        out=out,
        source=source,
        dtype=dtype_name(out_dtype),
        shards=len(shards),
        lora_updates=len(updates),
        verified=check["verified"],
        max_logit_diff=check.get("max_logit_diff"),
        relative_logit_diff=check.get("relative_logit_diff"),
        unverified_reason=check.get("unverified_reason"),
        seconds=round(time.monotonic() - started, 1),
    )


def render(merged: Merged) -> str:
    if merged.verified:
        verdict = (
            f"largest logit difference {merged.max_logit_diff:.2e} "
            f"({100 * merged.relative_logit_diff:.2f}% of the largest logit)"
        )
    else:
        verdict = f"NOT verified: {merged.unverified_reason}"
    return (
        f"merged {merged.adapter} into {merged.out} "
        f"({merged.source} base, {merged.dtype}, {merged.shards} shard(s)); {verdict}"
    )


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise QloraError(f"--dtype {name!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def check_supported(adapter_config: dict, name: str) -> None:
    """Refuse adapters whose update is not W += scaling * B @ A on plain linear weights."""
    problems = []
    if adapter_config.get("peft_type") != "LORA":
        problems.append(f"peft_type {adapter_config.get('peft_type')} (only LoRA merges)")
    if adapter_config.get("lora_bias"):
        problems.append("lora_bias: true")
    if adapter_config.get("fan_in_fan_out"):
        problems.append("fan_in_fan_out: true (Conv1D layers, as in GPT-2)")
    if adapter_config.get("target_parameters"):
        problems.append("target_parameters (LoRA on raw parameters, as in fused MoE experts)")
    init = adapter_config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        problems.append(f"init_lora_weights: {init} (it rewrote the base weights during training)")
    if problems:
        raise QloraError(
            f"adapter {name!r} cannot be merged shard by shard: {'; '.join(problems)}; use it unmerged with qlora generate"
        )


def plan_lora_updates(
    adapter_weights: dict[str, torch.Tensor], adapter_config: dict, base_keys: set[str], name: str
) -> dict[str, LoraUpdate]:
    """Map each LoRA pair of the adapter to the base weight it updates, with its scaling.

    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` updates `model.layers.0.self_attn.q_proj.weight`.
    The scaling follows peft: alpha / r, or alpha / sqrt(r) with rsLoRA; rank_pattern and alpha_pattern
    override r and alpha per module, matched the way peft matches them."""
    from peft.utils.other import get_pattern_key

    rank_pattern = adapter_config.get("rank_pattern") or {}
    alpha_pattern = adapter_config.get("alpha_pattern") or {}
    updates = {}
    for key in adapter_weights:
        if key.endswith((MAGNITUDE, f"{MAGNITUDE}.weight")):
            continue  # read beside its module's lora_A below
        module, dot, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_A.")
        if not dot:
            if ".lora_B." not in key:
                raise QloraError(
                    f"adapter {name!r}: tensor {key} is not a LoRA factor (lora_A/lora_B); only LoRA updates can be merged"
                )
            continue
        if kind != "weight":
            raise QloraError(f"adapter {name!r}: unexpected LoRA tensor {key}")
        b_key = key.replace(".lora_A.", ".lora_B.")
        if b_key not in adapter_weights:
            raise QloraError(f"adapter {name!r}: {key} has no matching {b_key}; the adapter file is incomplete")
        target = f"{module}.weight"
        if target not in base_keys:
            raise QloraError(
                f"adapter {name!r}: {key} updates {target}, which the base does not have; is this the right base model?"
            )
        r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), adapter_config["r"])
        alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), adapter_config["lora_alpha"])
        magnitude = next(
            (
                name
                for name in (f"{PEFT_PREFIX}{module}{MAGNITUDE}", f"{PEFT_PREFIX}{module}{MAGNITUDE}.weight")
                if name in adapter_weights
            ),
            None,
        )
        if adapter_config.get("use_dora") and magnitude is None:
            raise QloraError(
                f"adapter {name!r}: DoRA adapter without a magnitude for {module}; the adapter file is incomplete"
            )
        updates[target] = LoraUpdate(
            key, b_key, alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r, magnitude
        )
    pairs_b = sum(".lora_B." in key for key in adapter_weights)
    if pairs_b != len(updates):
        raise QloraError(
            f"adapter {name!r}: {pairs_b} lora_B tensors but {len(updates)} lora_A; the adapter file is incomplete"
        )
    return updates


def nf4_weight_specs(model_dir: Path, section: ModelSection, base_keys: set[str]) -> dict[str, Nf4Spec]:
    """The weights a 4-bit load quantizes, and how: transformers' own quantizer decides, asked on an
    empty (meta-device) model, so skipped modules (lm_head, tied or fp32-kept ones) stay exact."""
    import bitsandbytes as bnb
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers.base import HfQuantizer

    from qlora_cli.model import bnb_config

    quantization = bnb_config(section)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=section.trust_remote_code)
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=section.trust_remote_code)
    skipped = HfQuantizer.get_modules_to_not_convert(
        empty, quantization.llm_int8_skip_modules, empty._keep_in_fp32_modules
    )
    empty = replace_with_bnb_linear(empty, modules_to_not_convert=skipped, quantization_config=quantization)
    specs = {
        f"{name}.weight": Nf4Spec(module.weight.quant_type, module.weight.blocksize, module.weight.compress_statistics)
        for name, module in empty.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }
    renamed = sorted(set(specs) - base_keys)
    if renamed:
        raise QloraError(
            f"base {section.id}: its checkpoint names {len(renamed)} quantized weights differently from the model "
            f"(e.g. {renamed[0]}), so the 4-bit round trip cannot be reproduced shard by shard; merge with --from original"
        )
    return specs


def shard_files(model_dir: Path) -> list[str]:
    """The base's safetensors files in index order (one file when the base is not sharded)."""
    files = [path.name for path in weight_files(model_dir)]
    if not (model_dir / INDEX).is_file() and len(files) != 1:
        raise QloraError(
            f"base {model_dir}: {len(files)} safetensors files but no {INDEX} saying how they fit together"
        )
    return files


def round_trip_4bit(weight: torch.Tensor, spec: Nf4Spec) -> torch.Tensor:
    """The weight as the 4-bit model sees it: quantized, then dequantized, in `weight`'s dtype."""
    import bitsandbytes.functional as bnb_functional

    packed, state = bnb_functional.quantize_4bit(
        weight.contiguous(), blocksize=spec.blocksize, compress_statistics=spec.double_quant, quant_type=spec.quant_type
    )
    return bnb_functional.dequantize_4bit(packed, state)


def merged_weight(
    weight: torch.Tensor,
    *,
    lora: tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None] | None,
    nf4: Nf4Spec | None,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """One base tensor as the merged model stores it; `lora` is (A, B, scaling, DoRA magnitude or None)."""
    if not weight.is_floating_point():
        return weight
    if nf4 is not None:
        # The 4-bit loader casts the checkpoint to the compute dtype before quantizing it.
        weight = round_trip_4bit(weight.to(compute_dtype), nf4)
    if lora is not None:
        lora_a, lora_b, scaling, magnitude = lora
        # In fp32 and in place: W + scaling * B @ A without a second full-size temporary.
        weight = weight.float().addmm_(lora_b.float(), lora_a.float(), alpha=scaling)
        if magnitude is not None:  # DoRA: each output row takes its learned norm, as peft's merge does
            weight.mul_((magnitude.float() / torch.linalg.vector_norm(weight, dim=1)).unsqueeze(1))
    return weight.to(out_dtype).contiguous()


def merge_shard(
    source: Path,
    dest: Path,
    adapter_weights: dict[str, torch.Tensor],
    updates: dict[str, LoraUpdate],
    nf4_specs: dict[str, Nf4Spec],
    *,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> int:
    """Merge one shard into `dest`, one tensor at a time; return the bytes of tensor data written.
    Floating tensors are written in `out_dtype`, the others as they are; the peak holds one tensor and its
    temporaries (safetensors_io says why not safetensors.torch)."""
    with TensorReader(source) as reader:
        layout = {
            key: (out_dtype if entry.torch_dtype.is_floating_point else entry.torch_dtype, entry.shape)
            for key, entry in reader.tensors.items()
        }
        with TensorWriter(dest, layout) as writer:
            for key in reader.tensors:
                update = updates.get(key)
                lora = (
                    (
                        adapter_weights[update.a_key],
                        adapter_weights[update.b_key],
                        update.scaling,
                        adapter_weights[update.magnitude_key] if update.magnitude_key else None,
                    )
                    if update
                    else None
                )
                tensor = merged_weight(
                    reader.read(key),
                    lora=lora,
                    nf4=nf4_specs.get(key),
                    compute_dtype=compute_dtype,
                    out_dtype=out_dtype,
                )
                writer.write(key, tensor)
                del tensor  # before the next read, so that the peak holds one tensor, not two
    return writer.data_bytes


def write_model_files(
    model_dir: Path,
    adapter_dir: Path,
    staging: Path,
    section: ModelSection,
    base_config: dict,
    out_dtype: torch.dtype,
    sizes: dict[str, int],
) -> None:
    """Everything beside the weights that a plain `from_pretrained` needs: config, index, tokenizer."""
    from transformers import AutoTokenizer

    config = {key: value for key, value in base_config.items() if key != "quantization_config"}
    config["dtype"] = dtype_name(out_dtype)
    if "torch_dtype" in config:  # transformers < 4.56 reads only this name
        config["torch_dtype"] = dtype_name(out_dtype)
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (model_dir / "generation_config.json").is_file():
        (staging / "generation_config.json").write_text((model_dir / "generation_config.json").read_text())
    if (model_dir / INDEX).is_file():
        index = json.loads((model_dir / INDEX).read_text())
        index["metadata"] = {"total_size": sum(sizes.values())}
        (staging / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    # The adapter's tokenizer, not the base's: it carries the padding and template choices training made.
    AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=section.trust_remote_code).save_pretrained(staging)


def verify_merge(
    merged_dir: Path,
    adapter_dir: Path,
    model_dir: Path,
    section: ModelSection,
    source: Source,
    out_dtype: torch.dtype,
    style: Style,
    tolerance: float | None,
    memory: dict[int | str, int] | None = None,
) -> dict:
    """Compare the merged model's logits with base+adapter's on a few prompts; raise if they differ.
    Running out of memory while checking is not a failed merge: it returns verified false and why."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir, trust_remote_code=section.trust_remote_code)
    prompts = verification_inputs(tokenizer, style)
    device = check_device(
        section.model_copy(update={"device": "auto"})
    )  # merging needs no GPU, whatever training ran on
    # The reference is exactly what `qlora generate` runs: the 4-bit base (or the 16-bit one) plus the adapter.
    reference_section = section if source == "nf4" else section.model_copy(update={"load_in_4bit": False})
    try:
        reference = PeftModel.from_pretrained(load_model(reference_section, model_dir, device=device), str(adapter_dir))
        use_exact_4bit_matmul(reference)
        expected = model_logits(reference, prompts)
        del reference  # one model in memory at a time
        release_memory()
        with tempfile.TemporaryDirectory(prefix=".verify-offload-", dir=merged_dir) as offload:
            merged = AutoModelForCausalLM.from_pretrained(
                merged_dir,
                dtype=out_dtype,
                device_map="auto",
                max_memory=memory or free_memory(device),
                offload_folder=offload,
            )
            placed = sorted(
                {str(where) for where in (getattr(merged, "hf_device_map", None) or {"": device.type}).values()}
            )
            log.info("verifying the merged model on %s", ", ".join(placed))
            actual = model_logits(merged, prompts)
            del merged
    except (torch.OutOfMemoryError, MemoryError) as error:
        release_memory()
        reason = f"out of memory while verifying on {device.type}: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        log.warning("the merged model is complete but NOT verified (%s); check it on a box with more memory", reason)
        return {"verified": False, "unverified_reason": reason}

    max_diff = max((a - e).abs().max().item() for a, e in zip(actual, expected))
    scale = max(e.abs().max().item() for e in expected)
    relative = max_diff / scale if scale else max_diff
    coarsest = max(out_dtype, DTYPES[section.compute_dtype], key=lambda dtype: DEFAULT_TOLERANCE[dtype])
    allowed = DEFAULT_TOLERANCE[coarsest] if tolerance is None else tolerance
    log.info(
        "verification: largest logit difference %.4g (%.3g%% of the largest logit %.4g), allowed %.3g%%",
        max_diff,
        100 * relative,
        scale,
        100 * allowed,
    )
    if not relative <= allowed:
        raise QloraError(
            f"merge check failed: the merged model's logits differ from base+adapter by up to {max_diff:.4g} "
            f"({100 * relative:.3g}% of the largest logit, allowed {100 * allowed:.3g}%); nothing was written. "
            "Check the base model and the adapter, or merge with a wider --dtype"
        )
    return {
        "verified": True,
        "max_logit_diff": float(f"{max_diff:.4g}"),
        "relative_logit_diff": float(f"{relative:.4g}"),
        "tolerance": allowed,
    }


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # otherwise the caching allocator keeps the reference's memory from the merged model


def free_memory(device: torch.device) -> dict[int | str, int]:
    """What the merged model may occupy while verified, as accelerate's max_memory: most of the free GPU
    memory, then most of the available RAM; accelerate offloads the remaining layers to disk."""
    budget: dict[int | str, int] = {}
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget[device.index or 0] = max(0, int(free * 0.9) - 2**30)  # a GiB for activations and logits
    budget["cpu"] = int(available_ram() * 0.8)
    return budget


def available_ram() -> int:
    """Bytes of RAM the kernel can hand out without swapping (Linux's MemAvailable), else physical RAM."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def use_exact_4bit_matmul(model: torch.nn.Module) -> None:
    """Make 4-bit layers on CPU compute with the dequantized weights training used.

    In eval mode on a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights for a fast kernel that
    rounds the block scales to bf16 (bitsandbytes.functional._convert_weight_packed_for_cpu): an
    inference shortcut training never took, worth ~0.5% of the logits, which the check would
    wrongly blame on the merge."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def verification_inputs(tokenizer, style: Style) -> list[torch.Tensor]:
    """Prompts as the adapter is prompted (its template, as generate renders them), plus one row of token ids
    spread over the whole vocabulary so that embedding rows the prompts never touch are checked too."""
    renderer = Renderer(style, tokenizer)
    rows = [
        torch.tensor([renderer.prompt_ids({"instruction": instruction, "input": ""})])
        for instruction in VERIFY_INSTRUCTIONS
    ]
    spread = torch.linspace(0, len(tokenizer) - 1, steps=min(64, len(tokenizer))).long()
    return [*rows, spread.unsqueeze(0)]


@torch.inference_mode()
def model_logits(model, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    model.eval()
    # A model dispatched over GPU, CPU and disk moves inputs itself; its `device` may then read "meta".
    device = model.get_input_embeddings().weight.device
    device = device if device.type != "meta" else torch.device("cpu")
    return [model(input_ids=ids.to(device)).logits.float().cpu() for ids in prompts]
