"""`qlora serve --print-vllm`: the adapters checked against what vLLM and SGLang serve, and the commands that
serve them there.

Past one process, multi-LoRA servers with paged attention and token-level batching do better than ours;
what users lose on the way is the details: vLLM accepts only some ranks for --max-lora-rank and refuses
DoRA, modules_to_save and trained biases, and both serve the 16-bit base (not the 4-bit one training used)
with the adapters on top. Each adapter is checked from its adapter_config.json alone, no weights loaded.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from qlora_cli import adapters
from qlora_cli.adapters import AdapterRecord, check_one_base
from qlora_cli.errors import QloraError

# vLLM's LoRAConfig.max_lora_rank takes only these values (vllm/config/lora.py, MaxLoRARanks).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# The projections both servers apply LoRA to in Llama, Mistral and Qwen2 models (vLLM packs q/k/v and
# gate/up internally); an adapter on anything else (embeddings, lm_head, norms) is not served as trained.
SERVED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Checked:
    name: str
    folder: Path
    rank: int
    targets: tuple[str, ...]
    problems: tuple[str, ...]


def check_adapter(folder: Path) -> Checked:
    """What keeps vLLM and SGLang from serving one adapter as it was trained."""
    config = json.loads((folder / "adapter_config.json").read_text())
    ranks = [int(config.get("r") or 0), *map(int, (config.get("rank_pattern") or {}).values())]
    targets = config.get("target_modules") or []
    targets = sorted(targets) if isinstance(targets, list) else [targets]
    problems = []
    if config.get("use_dora"):
        problems.append("DoRA: neither vLLM nor SGLang serves DoRA adapters; merge it (qlora merge) instead")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}: vLLM serves only LoRA factors; merge it instead")
    if (config.get("bias") or "none") != "none":
        problems.append(f"bias {config['bias']!r}: trained biases are not served; merge it instead")
    unserved = [target for target in targets if target not in SERVED_MODULES]
    if unserved:
        problems.append(f"target modules {unserved}: served only on {', '.join(SERVED_MODULES)}")
    if max(ranks) > VLLM_RANKS[-1]:
        problems.append(f"rank {max(ranks)}: vLLM serves ranks up to {VLLM_RANKS[-1]}")
    return Checked(folder.name, folder.resolve(), max(ranks), tuple(targets), tuple(problems))


@dataclass(frozen=True)
class Handoff:
    base: str
    revision: str | None
    adapters: tuple[Checked, ...]

    @property
    def servable(self) -> bool:
        return not any(adapter.problems for adapter in self.adapters)

    def vllm(self) -> str:
        rank = next(value for value in VLLM_RANKS if value >= max(a.rank for a in self.adapters))
        modules = [f"{a.name}={a.folder}" for a in self.adapters]
        count = str(len(self.adapters))
        revision = ["--revision", self.revision] if self.revision else []
        command = ["vllm", "serve", self.base, *revision, "--enable-lora", "--lora-modules", *modules]
        return shlex.join([*command, "--max-lora-rank", str(rank), "--max-loras", count, "--max-cpu-loras", count])

    def sglang(self) -> str:
        targets = sorted({target for a in self.adapters for target in a.targets})
        command = ["python", "-m", "sglang.launch_server", "--model-path", self.base]
        if self.revision:
            command += ["--revision", self.revision]
        command += ["--enable-lora", "--lora-paths", *[f"{a.name}={a.folder}" for a in self.adapters]]
        command += [
            "--max-loras-per-batch",
            str(len(self.adapters)),
            "--max-lora-rank",
            str(max(a.rank for a in self.adapters)),
        ]
        return shlex.join([*command, "--lora-target-modules", *targets])

    def render(self) -> str:
        lines = []
        for adapter in self.adapters:
            verdict = "ok" if not adapter.problems else "; ".join(adapter.problems)
            lines.append(f"{adapter.name} (r={adapter.rank}, {', '.join(adapter.targets)}): {verdict}")
        if not self.servable:
            return "\n".join(lines)
        return "\n".join(
            [
                *lines,
                "",
                "# vLLM: clients send model=NAME (the adapter) or the base id",
                self.vllm(),
                "",
                "# SGLang: clients send model=BASE:NAME",
                self.sglang(),
                "",
                "# both load the 16-bit base and put the adapters on top of it (not the 4-bit base of training)",
            ]
        )


def handoff(adapter_refs: list[str], home: str | None = None) -> Handoff:
    folders = [adapters.find_adapter(ref, home) for ref in adapter_refs] or adapters.list_adapter_dirs(home)
    if not folders:
        raise QloraError(f"no adapters in {adapters.adapters_home(home)} to check; name some with --adapter")
    records = [AdapterRecord.load(folder) for folder in folders]
    check_one_base(records)
    section = records[0].base_section()
    return Handoff(base=section.id, revision=section.revision, adapters=tuple(check_adapter(f) for f in folders))
