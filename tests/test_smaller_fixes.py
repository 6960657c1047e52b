"""Small defects found where users run qlora: reverse-task prompts at inference, mixes of adapter folders,
fp16 overflow steps, and Mistral's second copy of the weights in hub downloads."""

import json

import torch
from safetensors.torch import save_file

from qlora_cli.generate import Session, parse_mix
from qlora_cli.model import fingerprint_weights, resolve_model_dir, weight_files
from qlora_cli.prompts import REVERSE_INSTRUCTION, Style, render_example
from qlora_cli.recipe import ModelSection
from qlora_cli.train import FP16_OVERFLOWS_TOLERATED, DivergenceGuard

ROW = {"instruction": "Count the users.", "input": "table users (id)", "output": "SELECT COUNT(*) FROM users"}


def session(task: str) -> Session:
    return Session(model=None, tokenizer=None, base_id="base", styles={"sql": Style(task=task)})


def test_a_reverse_adapter_is_prompted_as_it_was_trained():
    reverse = session("reverse")
    # eval rows: the response is what it reads, the instruction (with its input) what it must write
    assert reverse.example(ROW, "sql") == render_example(ROW, "alpaca", "reverse")
    assert REVERSE_INSTRUCTION in reverse.prompt(ROW, "sql") and ROW["output"] in reverse.prompt(ROW, "sql")
    assert reverse.example(ROW, "sql")["completion"].startswith(ROW["instruction"])
    # generate: the text given is the response to reverse
    prompt = reverse.prompt({"instruction": "SELECT name FROM users"}, "sql")
    assert REVERSE_INSTRUCTION in prompt and "SELECT name FROM users" in prompt
    assert reverse.prompt(ROW, "none") == reverse.prompt(ROW, "sql")  # the base answers the same question
    forward = session("forward")
    assert forward.example(ROW, "sql") == render_example(ROW, "alpaca", "forward")


def test_mix_names_may_be_folder_paths_holding_an_equals_sign():
    assert parse_mix("./runs/a=b/sql=0.7,json=0.3") == {"./runs/a=b/sql": 0.7, "json": 0.3}


def test_fp16_overflow_steps_are_skipped_and_only_a_lasting_non_finite_loss_stops():
    fp16 = DivergenceGuard(tolerated=FP16_OVERFLOWS_TOLERATED)
    assert not any(fp16.must_stop(False) for _ in range(FP16_OVERFLOWS_TOLERATED))
    assert not fp16.must_stop(True)  # the scaler found its scale: the streak starts over
    assert not any(fp16.must_stop(False) for _ in range(FP16_OVERFLOWS_TOLERATED))
    assert fp16.must_stop(False)
    assert DivergenceGuard(tolerated=0).must_stop(False)  # bf16/fp32: the first non-finite loss stops


def test_mistral_consolidated_weights_are_neither_downloaded_nor_fingerprinted(tmp_path, monkeypatch):
    save_file({"model.embed_tokens.weight": torch.ones(4, 4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    alone = fingerprint_weights(tmp_path)
    save_file({"tok_embeddings.weight": torch.zeros(4, 4)}, str(tmp_path / "consolidated.safetensors"))
    assert [path.name for path in weight_files(tmp_path)] == ["model.safetensors"]
    assert fingerprint_weights(tmp_path) == alone

    # The download, through the hub's own file filter (no network here: the hub call is the one thing stubbed).
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    asked = {}

    def snapshot_download(repo_id, **patterns):
        asked.update(patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert resolve_model_dir(ModelSection(id="mistralai/Mistral-7B-v0.3")) == tmp_path
    repo_files = ["config.json", "model.safetensors", "consolidated.safetensors", "tokenizer.model"]
    fetched = filter_repo_objects(
        repo_files, allow_patterns=asked["allow_patterns"], ignore_patterns=asked["ignore_patterns"]
    )
    assert list(fetched) == ["config.json", "model.safetensors", "tokenizer.model"]
