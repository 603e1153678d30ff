"""Reader (validated header, mmap, shards, every dtype) and streaming writer (atomic, readable by safetensors)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from convert_helpers import leftovers, write
from safetensors import safe_open
from safetensors.torch import load_file

from comfyquant.errors import CorruptFileError, UserError
from comfyquant.io.reader import CheckpointReader
from comfyquant.io.writer import StreamingWriter, TensorSpec, save_file

ALL_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
              torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)


def _tensor(dtype: torch.dtype, shape=(3, 5), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 10
    if dtype == torch.bool:
        return x > 0
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return x.clamp(info.min, info.max).to(dtype)
    return x.to(dtype)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_reader_every_dtype_matches_safetensors(tmp_path):
    tensors = {f"t_{str(d)[6:]}": _tensor(d, seed=i) for i, d in enumerate(ALL_DTYPES)}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    p = write(tmp_path / "a.safetensors", tensors, {"who": "me"})
    r = CheckpointReader(p)
    assert set(r.infos) == set(tensors) and r.metadata == {"who": "me"}
    ref = load_file(str(p))
    for name, t in tensors.items():
        info = r.infos[name]
        assert info.dtype == t.dtype and info.shape == tuple(t.shape) and info.nbytes == t.numel() * t.element_size()
        got = r.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert _bits(got) == _bits(ref[name]) == _bits(t)


def test_reader_infos_in_file_order_and_get_is_a_view_of_the_file(tmp_path):
    p = write(tmp_path / "a.safetensors", {"b": torch.ones(4), "a": torch.zeros(8), "c": torch.full((2,), 3.0)})
    r = CheckpointReader(p)
    offsets = [t.offset for t in r.infos.values()]
    assert offsets == sorted(offsets)
    before = p.read_bytes()
    for name in r.infos:
        r.prefetch(name)  # a read-ahead hint only: nothing changes
    t = r.get("a")
    t += 1  # private copy-on-write mapping: the file must stay untouched
    assert p.read_bytes() == before


def test_sharded_index(tmp_path):
    a = {"x.weight": _tensor(torch.float32, (4, 4)), "x.bias": _tensor(torch.float32, (4,), 1)}
    b = {"y.weight": _tensor(torch.bfloat16, (2, 4), 2)}
    write(tmp_path / "m-00001.safetensors", a, {"one": "1"})
    write(tmp_path / "m-00002.safetensors", b, {"two": "2"})
    wm = {**dict.fromkeys(a, "m-00001.safetensors"), **dict.fromkeys(b, "m-00002.safetensors")}
    idx = tmp_path / "m.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": wm}))
    for path in (idx, tmp_path):  # the index, or the directory holding it
        r = CheckpointReader(path)
        assert set(r.infos) == set(wm) and r.metadata == {"one": "1", "two": "2"}
        assert torch.equal(r.get("y.weight"), b["y.weight"])
    wm["z.weight"] = "m-00002.safetensors"
    idx.write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(CorruptFileError, match=r"z\.weight"):
        CheckpointReader(idx)
    idx.write_text(json.dumps({"weight_map": {"x.weight": "missing.safetensors"}}))
    with pytest.raises(UserError, match="does not exist"):
        CheckpointReader(idx)


def _raw(header: dict, data: bytes, pad: bytes = b"") -> bytes:
    h = json.dumps(header).encode() + pad
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize(("blob", "message"), [
    (b"", "empty"),
    (b"\x80\x04\x95", "pickled"),
    (b"PK\x03\x04rest-of-zip", "zip archive"),
    (b"abc", "too short"),
    (struct.pack("<Q", 10**9) + b"{}", "header length"),
    (struct.pack("<Q", 4) + b"[1] ", "not a JSON object"),
    (struct.pack("<Q", 5) + b"{\"a\":", "corrupt safetensors header"),
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "truncated"),
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12), "trailing"),
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "needs 8"),
    (_raw({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8), "unknown dtype"),
    (_raw({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8), "invalid shape"),
    (_raw({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
           "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, b"\0" * 12), "gap"),
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "overlaps"),
    (_raw({"__metadata__": {"a": 1}}, b""), "__metadata__"),
])
def test_reader_rejects_bad_files(tmp_path, blob, message):
    p = tmp_path / "bad.safetensors"
    p.write_bytes(blob)
    with pytest.raises(CorruptFileError, match=message) as e:
        CheckpointReader(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_reader_rejects_duplicate_keys(tmp_path):
    h = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    p = tmp_path / "dup.safetensors"
    p.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 4)
    with pytest.raises(CorruptFileError, match="duplicate"):
        CheckpointReader(p)


def test_missing_input(tmp_path):
    with pytest.raises(UserError, match="not found"):
        CheckpointReader(tmp_path / "nope.safetensors")


def test_writer_output_loads_in_safetensors(tmp_path):
    tensors = {f"t{i}": _tensor(d, (4, 3), i) for i, d in enumerate(ALL_DTYPES)}
    tensors["s"] = torch.tensor(1.5)
    tensors["e"] = torch.zeros(0, dtype=torch.uint8)
    out = tmp_path / "out.safetensors"
    save_file(out, tensors, {"format": "x"})
    ref = load_file(str(out))
    assert list(ref) == list(tensors) or set(ref) == set(tensors)
    for k, t in tensors.items():
        assert ref[k].dtype == t.dtype and _bits(ref[k]) == _bits(t)
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "x"}
    header_len = struct.unpack("<Q", out.read_bytes()[:8])[0]
    assert header_len % 8 == 0
    assert leftovers(tmp_path) == []


def test_writer_validates_and_cleans_up(tmp_path):
    out = tmp_path / "o.safetensors"
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.int8, (3,))]
    for bad in (("a", torch.zeros(3)), ("a", torch.zeros(2, dtype=torch.float16)), ("b", torch.zeros(2))):
        with pytest.raises(ValueError), StreamingWriter(out, specs) as w:
            w.write(*bad)
        assert not out.exists() and leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="only 1 of 2"), StreamingWriter(out, specs) as w:
        w.write("a", torch.zeros(2))
    assert not out.exists() and leftovers(tmp_path) == []
    with pytest.raises(KeyboardInterrupt), StreamingWriter(out, specs) as w:
        w.write("a", torch.zeros(2))
        assert leftovers(tmp_path)  # the temporary file exists while writing
        raise KeyboardInterrupt
    assert not out.exists() and leftovers(tmp_path) == []


def test_writer_refuses_existing_output_unless_overwrite(tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(UserError, match="exists"):
        save_file(out, {"a": torch.zeros(1)})
    assert out.read_bytes() == b"keep me"
    save_file(out, {"a": torch.ones(1)}, overwrite=True)
    assert torch.equal(load_file(str(out))["a"], torch.ones(1))
