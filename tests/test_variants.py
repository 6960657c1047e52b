"""The LoRA variants of the recipe (DoRA, rsLoRA, LoRA+, and the gaussian, PiSSA, OLoRA and LoftQ inits),
each trained on the shipped tiny base through `qlora train`, and carried through merge and plain peft."""

import json

import pytest
from helpers import TINY, assert_resumed_as_straight, stopped_by_sigterm, write_recipe

import qlora_cli  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads)

# isort: split
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from qlora_cli import merge
from qlora_cli.lora import lora_config
from qlora_cli.recipe import LoraSection
from qlora_cli.testing import build_adapter, build_base

pytestmark = pytest.mark.pipeline
QUICK = {"max_steps": 2, "logging_steps": 1, "save_steps": 2, "batch_size": 2, "grad_accum": 1}


def variant_recipe(tmp_path, name: str, lora: dict, model: dict | None = None, train: dict | None = None):
    return write_recipe(
        tmp_path,
        name,
        lora=lora,
        train={**QUICK, **(train or {})},
        data={"max_rows": 8, "eval_path": None},
        model=model or {},
    )


def train(tmp_path, run_cli, name: str, lora: dict, model: dict | None = None):
    recipe = variant_recipe(tmp_path, name, lora, model)
    code, out, err = run_cli(["train", str(recipe), "--adapters-dir", str(tmp_path / "adapters")])
    assert code == 0, err[-3000:]
    return tmp_path / "adapters" / name


def test_each_key_reaches_peft_as_set():
    config = lora_config(
        LoraSection(name="x", use_dora=True, use_rslora=True, init="gaussian", target_modules=["q_proj"])
    )
    assert (config.use_dora, config.use_rslora, config.init_lora_weights) == (True, True, "gaussian")
    assert lora_config(LoraSection(name="x")).init_lora_weights is True  # kaiming: peft's own default
    assert lora_config(LoraSection(name="x", init="pissa")).init_lora_weights.startswith("pissa")


def test_dora_rslora_and_lora_plus_train_together_and_the_record_says_so(tmp_path, run_cli):
    adapter = train(tmp_path, run_cli, "variants", {"use_dora": True, "use_rslora": True, "lora_plus_ratio": 16})
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["use_dora"] and config["use_rslora"]
    record = json.loads((adapter / "qlora.json").read_text())["lora"]
    assert (record["use_dora"], record["use_rslora"], record["lora_plus_ratio"]) == (True, True, 16)
    # LoRA+ put B in a group of its own, at 16x the rate of A.
    state = torch.load(
        tmp_path / "runs" / "variants" / "checkpoint-2" / "optimizer.pt", map_location="cpu", weights_only=False
    )
    rates = [group["initial_lr"] for group in state["param_groups"] if group["params"]]
    assert max(rates) / min(rates) == pytest.approx(16)


@pytest.mark.parametrize(
    ("init", "model"), [("olora", {}), ("loftq", {}), ("gaussian", {}), ("pissa", {"load_in_4bit": False})]
)
def test_each_init_trains_and_the_adapter_loads_on_the_original_base_with_plain_peft(tmp_path, run_cli, init, model):
    adapter = train(tmp_path, run_cli, init, {"init": init, "r": 4, "target_modules": ["q_proj", "v_proj"]}, model)
    config = json.loads((adapter / "adapter_config.json").read_text())
    # PiSSA and OLoRA moved part of the base into the adapter; the export is plain LoRA on the original base:
    # (trained - initial) as a rank-2r adapter.
    assert config["init_lora_weights"] in (True, "gaussian")
    assert config["r"] == (8 if init in ("pissa", "olora") else 4)
    base = AutoModelForCausalLM.from_pretrained(TINY / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter)
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert torch.isfinite(adapted).all() and not torch.equal(adapted, plain)


def test_a_variant_run_stopped_by_sigterm_resumes_to_the_uninterrupted_adapter(tmp_path, run_cli):
    """OLoRA rewrites the base as it initialises: the resumed session initialises again, and the export
    subtracts the initial adapter the first session saved. rsLoRA's scaling and LoRA+'s optimizer groups
    come back from the checkpoint."""
    home = tmp_path / "adapters"
    lora = {"init": "olora", "use_rslora": True, "lora_plus_ratio": 4, "r": 4, "target_modules": ["q_proj", "v_proj"]}
    steps = {"max_steps": 4, "save_steps": 2, "batch_size": 4}
    recipes = {name: variant_recipe(tmp_path, name, lora, train=steps) for name in ("olora-straight", "olora-resumed")}
    code, _, err = run_cli(["train", str(recipes["olora-straight"]), "--adapters-dir", str(home)])
    assert code == 0, err[-3000:]
    run_dir = stopped_by_sigterm(recipes["olora-resumed"], home)
    code, _, err = run_cli(["train", str(run_dir), "--resume", "--adapters-dir", str(home)])
    assert code == 0, err[-3000:]
    assert_resumed_as_straight(tmp_path / "runs" / "olora-straight", run_dir, home, tolerance=1e-5)


def test_pissa_on_a_4bit_base_and_loftq_on_a_16bit_one_are_refused_before_loading(tmp_path, run_cli):
    for name, lora, model in (
        ("pissa4", {"init": "pissa"}, {}),
        ("loftq16", {"init": "loftq"}, {"load_in_4bit": False}),
        ("dora-olora", {"init": "olora", "use_dora": True}, {}),
        ("dora-loftq", {"init": "loftq", "use_dora": True}, {}),
        ("dora-pissa", {"init": "pissa", "use_dora": True}, {"load_in_4bit": False}),
    ):
        recipe = write_recipe(tmp_path, name, lora=lora, model=model)
        code, _, err = run_cli(["train", str(recipe), "--adapters-dir", str(tmp_path / "adapters")])
        assert code == 1 and ("lora.init" in err or "lora.use_dora" in err), err
        assert not (tmp_path / "runs" / name).exists() and not (tmp_path / "adapters" / name).exists()


@pytest.mark.parametrize(("use_dora", "use_rslora"), [(True, True)])
def test_merge_carries_dora_magnitudes_and_rslora_scaling_and_verifies(tmp_path, use_dora, use_rslora):
    base = build_base(tmp_path / "base", layers=2, hidden=64, intermediate=128, vocab=128, heads=4, kv_heads=2)
    adapter = build_adapter(
        base, tmp_path / "base", tmp_path / "adapter", compute_dtype="float32", use_dora=use_dora, use_rslora=use_rslora
    )
    merged = merge.run(str(adapter), tmp_path / "merged")
    assert merged.verified, merged.unverified_reason
    assert merged.relative_logit_diff < 1e-3


def test_plan_counts_what_dora_adds_and_nothing_for_the_others():
    from helpers import MISTRAL_7B, MISTRAL_RECIPE

    from qlora_cli import memory
    from qlora_cli.recipe import load_recipe

    def total(*overrides: str) -> int:
        return memory.estimate(MISTRAL_7B, load_recipe(MISTRAL_RECIPE, list(overrides))).total

    plain = total()
    assert total("lora.use_rslora=true", "lora.lora_plus_ratio=16", "lora.init=olora") == plain
    dora = memory.estimate(MISTRAL_7B, load_recipe(MISTRAL_RECIPE, ["lora.use_dora=true"]))
    lora = memory.estimate(MISTRAL_7B, load_recipe(MISTRAL_RECIPE, []))
    # One fp32 magnitude per output row of each adapted linear, with its gradient and two Adam moments.
    rows = 32 * (4096 + 1024 + 1024 + 4096 + 14336 + 14336 + 4096)
    assert dora.lora_weights - lora.lora_weights == 4 * rows
    assert dora.optimizer_states - lora.optimizer_states == 8 * rows
    assert dora.dora_weights == (2 + 8) * 4096 * 14336 and lora.dora_weights == 0
    assert dora.total > plain
