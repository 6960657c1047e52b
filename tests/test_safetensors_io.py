"""safetensors_io against the safetensors library: files it writes read back bit for bit, files written
here load with safetensors.torch, and a merge-style stream (read, convert, write one tensor at a time)
keeps every tensor. Also the weights fingerprint, which hashes headers read here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qlora_cli.errors import QloraError
from qlora_cli.model import fingerprint_weights
from qlora_cli.safetensors_io import TensorReader, TensorWriter, read_header


def sample_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(17, 8, generator=generator).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=generator).to(torch.bfloat16),
        "model.norm.weight": torch.randn(8, generator=generator),
        "half": torch.randn(3, 5, generator=generator).to(torch.float16),
        "double": torch.randn(2, generator=generator).to(torch.float64),
        "fp8": torch.randn(4, 4, generator=generator).to(torch.float8_e4m3fn),
        "position_ids": torch.arange(11, dtype=torch.int64),
        "int8": torch.randint(-128, 127, (6,), dtype=torch.int8, generator=generator),
        "int32": torch.randint(-(2**31), 2**31 - 1, (2, 3), dtype=torch.int32, generator=generator),
        "mask": torch.tensor([True, False, True]),
        "bytes": torch.randint(0, 255, (9,), dtype=torch.uint8, generator=generator),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_reads_what_the_safetensors_library_writes(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "note": "x"})

    header = read_header(path)
    assert header.metadata == {"format": "pt", "note": "x"}
    assert set(header.tensors) == set(tensors)
    for name, tensor in tensors.items():
        entry = header.tensors[name]
        assert (entry.torch_dtype, entry.shape) == (tensor.dtype, tuple(tensor.shape)), name
        assert entry.nbytes == tensor.numel() * tensor.element_size(), name
    # in the order of their data, back to back: a reader going through them reads the file front to back
    entries = list(header.tensors.values())
    assert entries[0].begin == 0 and all(a.end == b.begin for a, b in zip(entries, entries[1:]))
    assert header.data_start + entries[-1].end == path.stat().st_size

    with TensorReader(path) as reader:
        for name in reader.tensors:
            tensor = reader.read(name)
            assert same_bits(tensor, tensors[name]), name
            # memory of its own, not a view into a mapped or shared buffer
            assert tensor.untyped_storage().nbytes() == reader.tensors[name].nbytes


def test_the_safetensors_library_loads_what_is_written_here(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "out.safetensors"
    layout = {name: (tensor.dtype, tensor.shape) for name, tensor in tensors.items()}
    with TensorWriter(path, layout) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    assert writer.data_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert (8 + len(read_header(path).raw)) % 8 == 0  # the data starts aligned, as safetensors writes it

    loaded = load_file(str(path))
    assert set(loaded) == set(tensors)
    assert all(same_bits(loaded[name], tensor) for name, tensor in tensors.items())
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_a_shard_streams_through_one_tensor_at_a_time_into_another_dtype(tmp_path):
    """What merge does with each shard: floating tensors rewritten in the output dtype, the rest kept."""
    tensors = sample_tensors()
    source, dest = tmp_path / "source.safetensors", tmp_path / "dest.safetensors"
    save_file(tensors, str(source))

    with TensorReader(source) as reader:
        layout = {
            name: (torch.bfloat16 if entry.torch_dtype.is_floating_point else entry.torch_dtype, entry.shape)
            for name, entry in reader.tensors.items()
        }
        with TensorWriter(dest, layout) as writer:
            for name in reader.tensors:
                tensor = reader.read(name)
                writer.write(name, tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor)
                del tensor

    loaded = load_file(str(dest))
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        expected = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert same_bits(loaded[name], expected), name
    assert list(read_header(dest).tensors) == list(read_header(source).tensors)  # same order as the source


def test_the_writer_refuses_what_would_make_a_wrong_file(tmp_path):
    layout = {"a": (torch.float32, (2,)), "b": (torch.bfloat16, (3,))}
    with pytest.raises(ValueError, match="wrote b, but the next declared tensor is a"):
        with TensorWriter(tmp_path / "order.safetensors", layout) as writer:
            writer.write("b", torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"a: got torch.float16 \(2,\), declared F32 \(2,\)"):
        with TensorWriter(tmp_path / "dtype.safetensors", layout) as writer:
            writer.write("a", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(ValueError, match="1 declared tensors never written, first b"):
        with TensorWriter(tmp_path / "short.safetensors", layout) as writer:
            writer.write("a", torch.zeros(2))


def test_truncated_and_foreign_files_are_user_errors(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"weight": torch.ones(64, 64)}, str(path))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(
        QloraError, match=r"truncated\.safetensors: truncated or corrupt safetensors file \(its tensors end"
    ):
        read_header(truncated)
    pickle = tmp_path / "pytorch_model.safetensors"
    pickle.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(QloraError, match="truncated or corrupt safetensors file .*; download or write it again"):
        read_header(pickle)
    not_json = tmp_path / "garbage.safetensors"
    not_json.write_bytes((4).to_bytes(8, "little") + b"{{{{")
    with pytest.raises(QloraError, match="its header is not JSON"):
        read_header(not_json)


def write_by_hand(path: Path) -> None:
    """A safetensors file assembled byte by byte, so that its bytes never depend on a library's version."""
    data = bytes(index % 251 for index in range(200_000))
    header = json.dumps({"bytes": {"dtype": "U8", "shape": [200_000], "data_offsets": [0, 200_000]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


def test_the_weights_fingerprint_keeps_the_value_adapters_recorded(tmp_path):
    # Adapters store this fingerprint and generate and merge refuse a base whose fingerprint differs,
    # so the same weights must keep fingerprinting the same.
    write_by_hand(tmp_path / "model.safetensors")
    assert fingerprint_weights(tmp_path) == "sha256:28d6491df6743d0665a5318ee9e29023"
    changed = bytearray((tmp_path / "model.safetensors").read_bytes())
    changed[-1] ^= 1  # inside the last 64 KiB sample
    (tmp_path / "model.safetensors").write_bytes(bytes(changed))
    assert fingerprint_weights(tmp_path) != "sha256:28d6491df6743d0665a5318ee9e29023"
