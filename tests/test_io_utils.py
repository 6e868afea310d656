import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file

from dlmscope.activations import mmap_safetensors
from dlmscope.io_utils import atomic_save_safetensors, file_sha256


def test_safetensors_written_with_their_sha256(tmp_path):
    """Our writer's files load with safetensors itself and with our memory map, bit for bit, every dtype we
    store; the digest it returns (hashed while writing) is the file's sha256."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"act": torch.randn(5, 3, generator=gen), "half": torch.randn(7, generator=gen).to(torch.bfloat16),
               "f16": torch.randn(2, 2, generator=gen).half(), "token": torch.arange(5),
               "masked": torch.tensor([True, False, True]), "byte": torch.arange(3, dtype=torch.uint8),
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5, dtype=torch.float64),
               "strided": torch.arange(12.0).view(3, 4).t()}
    path = tmp_path / "x.safetensors"
    digest = atomic_save_safetensors(path, tensors, metadata={"format": "pt"})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == file_sha256(path)
    for loaded in (load_file(path), mmap_safetensors(path)):
        assert set(loaded) == set(tensors)
        for name, t in tensors.items():
            assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert n % 8 == 0 and header["__metadata__"] == {"format": "pt"}
    for meta in (v for k, v in header.items() if k != "__metadata__"):  # each tensor aligned to its element size
        size = {"F64": 8, "I64": 8, "F32": 4, "F16": 2, "BF16": 2, "U8": 1, "BOOL": 1}[meta["dtype"]]
        assert meta["data_offsets"][0] % size == 0


def test_safetensors_unsupported_dtype_is_refused(tmp_path):
    with pytest.raises(TypeError, match="complex64"):
        atomic_save_safetensors(tmp_path / "x.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)})
    assert not list(tmp_path.iterdir())  # nothing half-written
