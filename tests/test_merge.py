"""`qlora merge` on a tiny random Mistral: real bitsandbytes NF4, peft and safetensors, on CPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import qlora_cli  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

# isort: split
import torch
import yaml
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GenerationConfig

from qlora_cli import merge
from qlora_cli.errors import QloraError
from qlora_cli.model import load_model
from qlora_cli.recipe import ModelSection
from qlora_cli.safetensors_io import read_header
from qlora_cli.testing import build_adapter, build_base

pytestmark = pytest.mark.pipeline

SHAPE = dict(layers=4, hidden=64, intermediate=128, vocab=128, heads=4, kv_heads=2, shards=4)
LINEARS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
LINEAR_WEIGHTS = [
    f"model.layers.{layer}.{block}.{name}.weight"
    for layer in range(SHAPE["layers"])
    for block, names in LINEARS.items()
    for name in names
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny base in >= 4 bf16 shards, an fp32-compute adapter (exact comparisons) and a bf16 one (the default)."""
    root = tmp_path_factory.mktemp("merge")
    model = build_base(root / "base", **SHAPE)
    build_adapter(model, root / "base", root / "adapter-fp32", name="adapter-fp32", compute_dtype="float32")
    build_adapter(
        AutoModelForCausalLM.from_pretrained(root / "base"),
        root / "base",
        root / "adapter-bf16",
        name="adapter-bf16",
        seed=7,
    )
    build_base(root / "other-base", **SHAPE, seed=1)
    return root


@pytest.fixture(scope="module")
def merged_nf4(workspace) -> tuple[Path, merge.Merged]:
    out = workspace / "merged-nf4"
    return out, merge.run(str(workspace / "adapter-fp32"), out)


@pytest.fixture(scope="module")
def merged_original(workspace) -> tuple[Path, merge.Merged]:
    out = workspace / "merged-original"
    return out, merge.run(str(workspace / "adapter-fp32"), out, source="original")


def reference_logits(workspace: Path, *, in_4bit: bool, input_ids: torch.Tensor) -> torch.Tensor:
    """What `qlora generate` computes: the base (4-bit or not) with the adapter on top."""
    section = ModelSection(id=str(workspace / "base"), compute_dtype="float32", load_in_4bit=in_4bit)
    model = PeftModel.from_pretrained(
        load_model(section, workspace / "base", device=torch.device("cpu")), str(workspace / "adapter-fp32")
    )
    merge.use_exact_4bit_matmul(model)
    return merge.model_logits(model, [input_ids])[0]


def plain_logits(folder: Path, input_ids: torch.Tensor) -> torch.Tensor:
    return merge.model_logits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), [input_ids])[0]


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def read_tensor(folder: Path, key: str) -> torch.Tensor:
    shard = json.loads((folder / merge.INDEX).read_text())["weight_map"][key]
    with safe_open(folder / shard, framework="pt") as handle:
        return handle.get_tensor(key)


def test_nf4_merge_matches_the_4bit_base_with_adapter_and_the_original_merge_does_not(
    workspace, merged_nf4, merged_original
):
    input_ids = torch.randint(0, SHAPE["vocab"], (2, 24), generator=torch.Generator().manual_seed(0))
    expected = reference_logits(workspace, in_4bit=True, input_ids=input_ids)
    assert relative_difference(plain_logits(merged_nf4[0], input_ids), expected) < 1e-5
    # The users' pain point: the pristine 16-bit merge misses what the adapter learned on NF4 weights.
    assert relative_difference(plain_logits(merged_original[0], input_ids), expected) > 0.05
    assert merged_nf4[1].relative_logit_diff < 1e-5


def test_original_merge_matches_the_16bit_base_with_adapter(workspace, merged_original):
    input_ids = torch.randint(0, SHAPE["vocab"], (2, 24), generator=torch.Generator().manual_seed(1))
    expected = reference_logits(workspace, in_4bit=False, input_ids=input_ids)
    assert relative_difference(plain_logits(merged_original[0], input_ids), expected) < 1e-5
    assert merged_original[1].source == "original"


def test_nf4_round_trip_changes_exactly_the_quantized_weights(merged_nf4, merged_original):
    for key in LINEAR_WEIGHTS:
        nf4, original = read_tensor(merged_nf4[0], key), read_tensor(merged_original[0], key)
        assert nf4.shape == original.shape
        assert (nf4 - original).abs().max() > 1e-3, key
    # Never quantized at 4-bit load, so both merges keep them as published.
    for key in (
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
    ):
        assert torch.equal(read_tensor(merged_nf4[0], key), read_tensor(merged_original[0], key)), key


def test_output_keeps_the_shard_layout_and_describes_itself(workspace, merged_nf4):
    out, result = merged_nf4
    base_shards = sorted(p.name for p in (workspace / "base").glob("*.safetensors"))
    assert len(base_shards) >= 4
    assert sorted(p.name for p in out.glob("*.safetensors")) == base_shards
    assert result.shards == len(base_shards)
    assert result.lora_updates == len(LINEAR_WEIGHTS)
    base_index = json.loads((workspace / "base" / merge.INDEX).read_text())
    index = json.loads((out / merge.INDEX).read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(
        tensor.numel() * tensor.element_size() for key in index["weight_map"] for tensor in [read_tensor(out, key)]
    )
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    record = json.loads((out / "qlora.json").read_text())
    adapter_record = json.loads((workspace / "adapter-fp32" / "qlora.json").read_text())
    assert record["kind"] == "merged" and record["source"] == "nf4" and record["adapter"] == "adapter-fp32"
    assert record["base"]["fingerprint"] == adapter_record["base"]["fingerprint"]
    assert record["max_logit_diff"] == result.max_logit_diff
    assert merge.render(result) == (
        f"merged {workspace / 'adapter-fp32'} into {out} (nf4 base, float32, {len(base_shards)} shard(s)); "
        f"largest logit difference {result.max_logit_diff:.2e} ({100 * result.relative_logit_diff:.2f}% of the largest logit)"
    )
    assert (out / "tokenizer.json").is_file()
    assert (
        GenerationConfig.from_pretrained(out).to_dict()
        == GenerationConfig.from_pretrained(workspace / "base").to_dict()
    )
    assert not list(workspace.glob(".merged-nf4.*"))  # no staging left behind


def test_merged_model_loads_with_plain_transformers_and_no_qlora_code(merged_nf4):
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"folder = {str(merged_nf4[0])!r}\n"
        "model = AutoModelForCausalLM.from_pretrained(folder)\n"
        "tokenizer = AutoTokenizer.from_pretrained(folder)\n"
        "ids = tokenizer('Give three tips', return_tensors='pt').input_ids\n"
        "out = model.generate(ids, max_new_tokens=4, do_sample=False)\n"
        "assert out.shape[1] == ids.shape[1] + 4, out.shape\n"
        "assert model.dtype == torch.float32, model.dtype\n"
        "assert not [m for m in sys.modules if m.startswith(('qlora_cli', 'peft', 'bitsandbytes'))]\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_existing_output_is_refused_without_force_and_replaced_with_it(workspace, merged_nf4):
    mine = workspace / "users-own-folder"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(QloraError, match="already exists; pass --force"):
        merge.run(str(workspace / "adapter-fp32"), mine)
    with pytest.raises(QloraError, match="not written by qlora"):
        merge.run(str(workspace / "adapter-fp32"), mine, force=True)
    assert (mine / "notes.txt").read_text() == "keep me"

    previous = workspace / "merged-again"
    shutil.copytree(merged_nf4[0], previous)
    with pytest.raises(QloraError, match="already exists"):
        merge.run(str(workspace / "adapter-fp32"), previous, verify=False)
    result = merge.run(str(workspace / "adapter-fp32"), previous, source="original", force=True, verify=False)
    assert result.max_logit_diff is None
    assert merge.render(result).endswith("; NOT verified: skipped (--no-verify)")
    assert json.loads((previous / "qlora.json").read_text())["source"] == "original"


def test_a_different_base_is_refused_naming_both(workspace):
    other = workspace / "other-base"
    with pytest.raises(QloraError) as refused:
        merge.run(str(workspace / "adapter-fp32"), workspace / "merged-other", base=str(other))
    message = str(refused.value)
    assert str(workspace / "base") in message and str(other) in message and "--allow-base-mismatch" in message
    assert not (workspace / "merged-other").exists()
    merge.run(
        str(workspace / "adapter-fp32"),
        workspace / "merged-other",
        base=str(other),
        allow_base_mismatch=True,
        verify=False,
    )
    assert json.loads((workspace / "merged-other" / "qlora.json").read_text())["base"]["id"] == str(other)


def test_bf16_merge_passes_its_default_tolerance_and_a_failed_check_leaves_nothing(workspace):
    result = merge.run(str(workspace / "adapter-bf16"), workspace / "merged-bf16")
    assert result.dtype == "bfloat16"
    assert 0 < result.relative_logit_diff < merge.DEFAULT_TOLERANCE[torch.bfloat16]
    failing = workspace / "merged-bf16-strict"
    # bf16 rounding of the merged weights cannot reproduce base+adapter exactly, so a zero tolerance must fail.
    with pytest.raises(QloraError, match="merge check failed"):
        merge.run(str(workspace / "adapter-bf16"), failing, tolerance=0.0)
    assert not failing.exists()
    assert not list(workspace.glob(".merged-bf16-strict*"))


def test_verification_within_a_small_memory_budget_offloads_and_agrees(workspace, merged_nf4, caplog):
    """Verification never needs the whole merged model in memory: with room for almost nothing, the
    layers stream from disk and the check gives the figure it gives with room to spare."""
    out = workspace / "merged-nf4-budget"
    with caplog.at_level("INFO", logger="qlora_cli.merge"):
        result = merge.run(str(workspace / "adapter-fp32"), out, verify_memory={"cpu": 64 * 1024})
    assert "verifying the merged model on" in caplog.text and "disk" in caplog.text
    assert result.verified is True
    assert result.max_logit_diff == pytest.approx(merged_nf4[1].max_logit_diff, rel=1e-3, abs=1e-6)
    assert not list(out.glob(".verify-offload-*"))  # the offload folder does not ship with the model


def test_verification_that_runs_out_of_memory_keeps_the_merge_marked_unverified(workspace, monkeypatch):
    """An OOM while checking (a 14B merged in bf16 on a 24 GB card) must not delete a finished merge."""
    out = workspace / "merged-oom"
    calls = []

    def out_of_memory_on_the_merged_model(model, prompts):
        calls.append(model)
        if len(calls) == 2:  # the reference ran; the merged model does not fit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 27.00 GiB")
        return real_model_logits(model, prompts)

    real_model_logits = merge.model_logits
    monkeypatch.setattr(merge, "model_logits", out_of_memory_on_the_merged_model)
    result = merge.run(str(workspace / "adapter-fp32"), out)
    assert result.verified is False and "out of memory" in result.unverified_reason
    record = json.loads((out / "qlora.json").read_text())
    assert record["verified"] is False and "out of memory" in record["unverified_reason"]
    assert AutoModelForCausalLM.from_pretrained(out) is not None  # complete and loadable


def test_nf4_source_is_refused_for_an_adapter_trained_on_a_16bit_base(workspace):
    adapter = workspace / "adapter-16bit-base"
    shutil.copytree(workspace / "adapter-fp32", adapter)
    recipe = yaml.safe_load((adapter / "recipe.yaml").read_text())
    recipe["model"] = {"id": recipe["model"]["id"], "load_in_4bit": False}
    (adapter / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(QloraError, match="--from original"):
        merge.run(str(adapter), workspace / "merged-16bit-base")


def test_nf4_specs_come_from_the_quantizer_and_skip_the_lm_head(workspace):
    base = workspace / "base"
    keys = {key for shard in merge.shard_files(base) for key in read_header(base / shard).tensors}
    specs = merge.nf4_weight_specs(base, ModelSection(id=str(base), double_quant=False), keys)
    assert sorted(specs) == sorted(LINEAR_WEIGHTS)
    assert "lm_head.weight" not in specs and "model.embed_tokens.weight" not in specs
    assert set(specs.values()) == {merge.Nf4Spec(quant_type="nf4", blocksize=64, double_quant=False)}


def test_benchmark_smoke_run_prints_both_rows_and_writes_json(tmp_path, capsys, monkeypatch):
    from benchmarks import bench_merge

    monkeypatch.setenv("COLUMNS", "200")  # the whole table on one line per row
    bench_merge.main(["--small", "--json", str(tmp_path / "bench.json")])  # each merge still in its own process
    printed = capsys.readouterr().out
    assert "streaming" in printed and "merge_and_unload" in printed
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["streaming", "merge_and_unload"]
    assert all(row["peak_rss_mib"] >= row["imports_rss_mib"] > 0 for row in rows)
