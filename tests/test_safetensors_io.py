import json

import pytest
import torch
from safetensors import safe_open

from qconvert.errors import QConvertError
from qconvert.formats.safetensors_io import SafetensorsFile, ShardedReader, ShardedWriter, write_safetensors

TENSORS = {
    "a": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
    "c": torch.tensor([[1, 2, 3]], dtype=torch.uint8),
    "d": torch.tensor([7], dtype=torch.int32),
    "e": torch.zeros(0, 5, dtype=torch.float16),
}


def test_writer_output_reads_back_with_the_reference_library(tmp_path):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, TENSORS, {"k": "v"})
    with safe_open(path, "pt") as f:
        assert f.metadata()["k"] == "v"
        for name, t in TENSORS.items():
            assert torch.equal(f.get_tensor(name), t)
    ours = SafetensorsFile(path)
    for name, t in TENSORS.items():
        assert torch.equal(ours.get(name), t) and ours.get(name).dtype == t.dtype


def test_sharded_writer_splits_and_indexes(tmp_path):
    w = ShardedWriter(tmp_path, max_shard_bytes=40)
    for name, t in TENSORS.items():
        w.add(name, t)
    weight_map = w.close()
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 1 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map
    r = ShardedReader(tmp_path)
    for name, t in TENSORS.items():
        assert torch.equal(r.get(name), t)
    assert not list(tmp_path.glob(".*")), "no scratch files may stay behind"


def _corrupt(path, mutate):
    raw = bytearray(path.read_bytes())
    path.write_bytes(bytes(mutate(raw)))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:5], "truncated"),
        (lambda b: (10**9).to_bytes(8, "little") + b[8:], "exceeds the file size"),
        (lambda b: b[:8] + b"!" + b[9:], "not valid JSON"),
        (lambda b: b[:-4], "outside the file"),
        (lambda b: b + b"junk", "after the last tensor"),
    ],
)
def test_corrupt_files_give_clear_errors(tmp_path, mutate, message):
    path = tmp_path / "x.safetensors"
    write_safetensors(path, TENSORS)
    _corrupt(path, mutate)
    with pytest.raises(QConvertError, match=message):
        SafetensorsFile(path)


def test_index_naming_a_path_outside_the_directory_is_refused(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", TENSORS)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../model.safetensors"}}))
    with pytest.raises(QConvertError, match="not a plain file name"):
        ShardedReader(tmp_path)
