"""Adapter directories: where they live, how they are named, what they say about themselves.

An adapter directory is plain peft output (adapter_config.json + adapter_model.safetensors) plus the
tokenizer, the resolved `recipe.yaml` and `qlora.json`: base model id and weight fingerprint,
template, metrics and library versions. `generate`, `eval` and `merge` need nothing else, and read
`qlora.json` through one type, `AdapterRecord`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich import box
from rich.table import Table
from rich.text import Text

from qlora_cli.errors import QloraError
from qlora_cli.files import MARKER
from qlora_cli.prompts import DEFAULT_TASK, DEFAULT_TEMPLATE, Style
from qlora_cli.recipe import ADAPTER_NAME, ModelSection
from qlora_cli.tables import Breakable, Fitted

HOME_ENV = "QLORA_ADAPTERS_DIR"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


DEFAULT_HOME = "adapters"  # relative to the working directory, like the runs/ folder beside it
VERSIONED = ("qlora-cli", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate")


class _Record(BaseModel):
    # Read back from disk, not typed by a user: keys a later qlora adds are kept, not refused.
    model_config = ConfigDict(extra="allow", frozen=True)


class BaseRecord(_Record):
    """The base an adapter was trained on (model.base_model_record writes it)."""

    id: str | None = None
    revision: str | None = None
    fingerprint: str | None = None
    architecture: str | None = None


class LoraRecord(_Record):
    r: int | None = None
    alpha: int | float | None = None
    target_modules: str | list[str] | None = None
    use_dora: bool = False
    use_rslora: bool = False
    lora_plus_ratio: float | None = None
    init: str = "kaiming"


class DataRecord(_Record):
    path: str | None = None
    examples: int | None = None
    columns: dict[str, str] = {}  # data.columns: eval reads held-out rows with the mapping training used


class AdapterRecord(_Record):
    """`qlora.json` of an adapter directory, as train.export_adapter writes it.

    Fields keep the order of the file, so that `adapters show` prints the record as written. A folder
    without the file (an adapter trained by plain peft) reads as an alpaca forward-task adapter on
    the base its adapter_config.json names."""

    folder: Path = Field(exclude=True)
    name: str
    recipe_file: str | None = None  # the recipe file it was trained from, so a name collision can name its owner
    base: BaseRecord = BaseRecord()
    template: str = DEFAULT_TEMPLATE  # alpaca, none, chat or a Jinja file's name
    # For chat and Jinja templates: the exact text trained with, so a later tokenizer cannot change the prompts.
    template_text: str | None = None
    template_sha256: str | None = None
    system: str | None = None  # data.system: generation gives it to conversations that have none
    end_of_turn: list[str] = []  # the tokens a reply ends with; generation stops at each
    format: str | None = None  # the training rows' data.format
    task: Literal["forward", "reverse"] = DEFAULT_TASK
    lora: LoraRecord = LoraRecord()
    method: str = "sft"  # train.method
    parent: str | None = None  # lora.init_from: the adapter this one continued
    data: DataRecord = DataRecord()
    metrics: dict[str, int | float | str | list[int]] = {}  # peak_memory is a sentence; train_loss_steps a pair
    created: str | None = None
    versions: dict[str, str] = {}

    @classmethod
    def load(cls, folder: Path) -> AdapterRecord:
        marker = folder / MARKER
        if not marker.is_file():
            return cls(folder=folder, name=folder.name, base=BaseRecord(), template=DEFAULT_TEMPLATE, task=DEFAULT_TASK)
        try:
            fields = json.loads(marker.read_text())
            if not isinstance(fields, dict):
                raise ValueError(f"a JSON {type(fields).__name__}, not an object")
            return cls.model_validate({"name": folder.name, **fields, "folder": folder})
        except (ValueError, ValidationError) as error:  # JSONDecodeError is a ValueError
            raise QloraError(
                f"{marker}: not a readable adapter record ({str(error).splitlines()[0]}); "
                f"train the adapter again, or remove {MARKER} to load it as a plain peft adapter"
            ) from None

    @property
    def style(self) -> Style:
        """How this adapter renders prompts: as it was trained."""
        if self.template_text is not None and self.template_sha256 not in (None, _sha256(self.template_text)):
            raise QloraError(
                f"{self.folder / MARKER}: template_text does not match its template_sha256; the record was edited. "
                "Train the adapter again, or restore the file"
            )
        return Style(template=self.template, template_text=self.template_text, system=self.system, task=self.task)

    def write(self) -> None:
        """Write `qlora.json` into the record's folder, stamped with the time and the library versions."""
        write_metadata(self.folder, **self.model_dump(mode="json", exclude={"created", "versions"}))

    def as_written(self) -> dict:
        """The record's fields as stored in `qlora.json` (for a folder without one: what it reads as)."""
        return self.model_dump(mode="json", exclude_unset=True)

    def base_section(self, override: str | None = None) -> ModelSection:
        """How to load the base: the model section of the adapter's recipe.yaml (or, without one, the
        base peft recorded), with `override` (--base) replacing the id. A local base is made absolute."""
        recipe_path = self.folder / "recipe.yaml"
        recipe = (yaml.safe_load(recipe_path.read_text()) or {}) if recipe_path.is_file() else {}
        section = dict(recipe.get("model") or {})
        if not section:
            peft_config = json.loads((self.folder / "adapter_config.json").read_text())
            section = {"id": peft_config["base_model_name_or_path"]}
        if override:
            section["id"] = override
        if Path(section["id"]).exists():
            section["id"] = str(Path(section["id"]).resolve())
        return ModelSection.model_validate(section)

    def check_base(self, base_id: str, fingerprint: str, *, allow_mismatch: bool = False) -> None:
        """Refuse a base whose weights differ from the ones the adapter was trained on."""
        recorded = self.base.fingerprint
        if recorded and recorded != fingerprint and not allow_mismatch:
            raise QloraError(
                f"adapter {self.name!r} was trained on {self.base.id} ({recorded}), but the base being loaded is "
                f"{base_id} ({fingerprint}); pass --allow-base-mismatch if you know they are the same model"
            )


def check_one_base(records: list[AdapterRecord]) -> None:
    """Adapters loaded side by side share one base: refuse a set trained on different ones."""
    if len({record.base.fingerprint for record in records} - {None}) > 1:
        listing = ", ".join(f"{record.name} ({record.base.id})" for record in records)
        raise QloraError(f"these adapters were trained on different bases and cannot share one: {listing}")


def adapters_home(override: str | Path | None = None) -> Path:
    return Path(override or os.environ.get(HOME_ENV) or DEFAULT_HOME)


def adapter_path(name: str, home: str | Path | None = None) -> Path:
    """Where an adapter called `name` lives (whether or not it exists yet)."""
    if not ADAPTER_NAME.match(name):
        raise QloraError(
            f"adapter name {name!r}: use letters, digits, '.', '_' or '-' only (no paths); or pass a folder path"
        )
    return adapters_home(home) / name


def find_adapter(name_or_path: str, home: str | Path | None = None) -> Path:
    """An existing adapter by name (in the adapters home) or by folder path."""
    if os.sep in name_or_path or "/" in name_or_path:
        path = Path(name_or_path)
        if not (path / "adapter_config.json").is_file():
            raise QloraError(f"adapter {name_or_path}: no adapter_config.json in that folder")
        return path
    path = adapter_path(name_or_path, home)
    if not (path / "adapter_config.json").is_file():
        available = ", ".join(sorted(a.name for a in list_adapter_dirs(home))) or "none yet (qlora train writes them)"
        raise QloraError(f"adapter {name_or_path!r} not found in {adapters_home(home)}; available: {available}")
    return path


def list_adapter_dirs(home: str | Path | None = None) -> list[Path]:
    root = adapters_home(home)
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / "adapter_config.json").is_file()
    )


def library_versions(names: tuple[str, ...] = VERSIONED) -> dict[str, str]:
    """Installed versions by distribution name; "not installed" for one that is missing."""
    found = {}
    for package in names:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


def write_metadata(folder: Path, **fields) -> None:
    record = {
        **fields,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
    }
    (folder / MARKER).write_text(json.dumps(record, indent=2) + "\n")


def directory_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@dataclass(frozen=True)
class ListedAdapter:
    record: AdapterRecord
    size_bytes: int


@dataclass(frozen=True)
class Listing:
    """Command `adapters list`: every adapter in the home, with its record."""

    home: Path
    adapters: tuple[ListedAdapter, ...]


def run_list(home: str | Path | None = None) -> Listing:
    found = list_adapter_dirs(home)
    return Listing(
        adapters_home(home),
        tuple(ListedAdapter(AdapterRecord.load(folder), directory_size(folder)) for folder in found),
    )


def render_list(listing: Listing) -> Fitted | Text:
    """One row per adapter, fitting 80 columns: the name stays whole (users type it next); model ids and
    paths wrap after a '/' or '-', dates at the space before the time, never mid-word (`adapters show
    NAME` has the rest)."""
    home = f"{listing.home}{os.sep}"
    if not listing.adapters:
        return Text(f"no adapters in the folder {home} yet; qlora train writes them there")
    count = len(listing.adapters)
    table = Table(
        title=f"{count} adapter{'s' if count != 1 else ''} in the folder {home}",
        caption="details: qlora adapters show NAME",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("name", no_wrap=True)
    table.add_column("base")
    table.add_column("r", justify="right")
    table.add_column("data")
    table.add_column("final loss", justify="right")
    table.add_column("size", justify="right")
    table.add_column("created")
    for listed in listing.adapters:
        record = listed.record
        loss = record.metrics.get("train_loss")  # the loss at the end of training, not the run's average
        # Adapters trained before train_loss_steps existed stored the run's average under train_loss.
        average = "train_loss_steps" not in record.metrics
        # Lineage under the name: an adapter continued from another (lora.init_from), and how.
        lineage = f"\n← {record.parent} ({record.method})" if record.parent else ""
        table.add_row(
            Text(record.folder.name + lineage),
            Breakable(_short_source(record.base.id)),
            Text(str(record.lora.r or "?")),
            Breakable(_short_source(record.data.path)),
            Text(f"{loss:.4g}{' (avg)' if average else ''}" if isinstance(loss, (int, float)) else "-"),
            Text(_size(listed.size_bytes)),
            Text((record.created or "?")[:16].replace("T", " ")),  # to the minute; adapters show has the rest
        )
    return Fitted(table)


def _short_source(source: str | None) -> str:
    """A local path as its last two parts (tiny/base, sql/train.jsonl: enough to tell them apart); a hub id whole."""
    if not source:
        return "?"
    path = Path(source)
    return str(Path(*path.parts[-2:])) if path.is_absolute() else source


def _size(size_bytes: int) -> str:
    return f"{size_bytes / 2**20:.1f} MiB" if size_bytes >= 2**20 else f"{size_bytes / 2**10:.0f} KiB"


@dataclass(frozen=True)
class Shown:
    """Command `adapters show`: one adapter's record and the recipe that made it."""

    record: AdapterRecord
    recipe: str | None


def run_show(name: str, home: str | Path | None = None) -> Shown:
    folder = find_adapter(name, home)
    recipe = folder / "recipe.yaml"
    return Shown(AdapterRecord.load(folder), recipe.read_text() if recipe.is_file() else None)


def render_show(shown: Shown) -> str:
    text = f"# {shown.record.folder}\n{json.dumps(shown.record.as_written(), indent=2)}\n"
    if shown.recipe is not None:
        text += f"\n# recipe.yaml\n{shown.recipe}\n"
    return text
