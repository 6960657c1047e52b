"""`qlora serve --print-vllm`: adapters checked against what vLLM and SGLang serve, and their commands."""

import json
import shlex

import pytest

from qlora_cli.scaleout import check_adapter, handoff

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def adapter(home, name, **config):
    folder = home / name
    folder.mkdir(parents=True)
    fields = {
        "r": 16,
        "lora_alpha": 32,
        "target_modules": PROJECTIONS,
        "bias": "none",
        "base_model_name_or_path": "org/base",
    }
    (folder / "adapter_config.json").write_text(json.dumps({**fields, **config}))
    (folder / "qlora.json").write_text(json.dumps({"name": name, "base": {"id": "org/base", "fingerprint": "f" * 16}}))
    (folder / "recipe.yaml").write_text("model:\n  id: org/base\n  revision: abc123\n")
    return folder


def test_servable_adapters_get_commands_with_the_right_limits(tmp_path, run_cli):
    adapter(tmp_path, "sql", r=16)
    adapter(tmp_path, "json", r=24, rank_pattern={"q_proj": 40})
    code, out, err = run_cli(["serve", "--print-vllm", "--adapters-dir", str(tmp_path)])
    assert code == 0, err
    vllm = next(shlex.split(line) for line in out.splitlines() if line.startswith("vllm serve"))
    assert vllm[:5] == ["vllm", "serve", "org/base", "--revision", "abc123"]
    assert vllm[vllm.index("--lora-modules") + 1 : vllm.index("--lora-modules") + 3] == [
        f"json={tmp_path / 'json'}",
        f"sql={tmp_path / 'sql'}",
    ]
    # vLLM takes only some ranks: the largest (40, from rank_pattern) rounds up to 64; SGLang takes it as is.
    assert vllm[vllm.index("--max-lora-rank") + 1] == "64" and vllm[vllm.index("--max-loras") + 1] == "2"
    sglang = next(shlex.split(line) for line in out.splitlines() if line.startswith("python -m sglang"))
    assert sglang[sglang.index("--max-lora-rank") + 1] == "40"
    assert sglang[sglang.index("--lora-target-modules") + 1 :] == sorted(PROJECTIONS)


@pytest.mark.parametrize(
    ("config", "problem"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "lora_only"}, "bias 'lora_only'"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "target modules ['embed_tokens']"),
        ({"r": 1024}, "rank 1024"),
    ],
)
def test_what_vllm_or_sglang_would_refuse_is_said_and_no_command_is_printed(tmp_path, run_cli, config, problem):
    adapter(tmp_path, "fine")
    adapter(tmp_path, "odd", **config)
    assert problem in check_adapter(tmp_path / "odd").problems[0]
    assert not check_adapter(tmp_path / "fine").problems
    code, out, _ = run_cli(["serve", "--print-vllm", "--adapters-dir", str(tmp_path)])
    assert code == 1
    assert problem in out and "vllm serve" not in out
    assert not handoff([], str(tmp_path)).servable
