"""Reading valid GGUF files: metadata, tensor table and tensor values equal gguf-py's (G19).

Covers a tiny file written by ``gguf.GGUFWriter`` with every metadata kind and ten tensor types,
and the real embedded SmolLM2-135M (Q4_1 + Q8_0 + F32).
"""

from __future__ import annotations

import gc
import os
import struct
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qkv.errors import ModelFormatError
from qkv.weights.gguf import GGUFFile, GGUFTensorInfo, read_gguf

import gguf  # a dev dependency: a missing install must fail, not skip


def oracle_metadata(reader: Any) -> tuple[dict[str, object], dict[str, str]]:
    """gguf-py's view of the metadata (without its GGUF.* pseudo-fields)."""
    values, types = {}, {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        values[key] = field.contents()
        names = [t.name for t in field.types]
        types[key] = names[0] if len(names) == 1 else f"ARRAY[{names[-1]}]"
    return values, types


def oracle_tensor(t: Any) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


def assert_same_bits(got: torch.Tensor, ref: np.ndarray, name: str) -> None:
    g = got.numpy()
    assert g.shape == ref.shape, name
    np.testing.assert_array_equal(g.view(np.uint32), ref.view(np.uint32), err_msg=name)


# ---------------------------------------------------------------------------------------------
# tiny file from GGUFWriter


def test_tiny_metadata_equals_gguf_py(tiny_gguf: Path) -> None:
    with read_gguf(tiny_gguf) as f:
        values, types = oracle_metadata(gguf.GGUFReader(str(tiny_gguf)))
        assert f.metadata == values
        assert f.field_types == types
        assert list(f.metadata) == list(values)  # file order kept
        assert f.field_types["tokenizer.ggml.scores"] == "ARRAY[FLOAT32]"
        assert f.metadata["test.bools"] == [True, False, True]
        assert all(type(v) is bool for v in f.metadata["test.bools"])  # type: ignore[union-attr]


def test_tiny_tensor_table_equals_gguf_py(tiny_gguf: Path) -> None:
    reader = gguf.GGUFReader(str(tiny_gguf))
    with read_gguf(tiny_gguf) as f:
        assert f.version == 3 and f.alignment == 32 and f.data_offset == reader.data_offset
        assert list(f.tensors) == [t.name for t in reader.tensors]
        for t in reader.tensors:
            info = f.tensors[t.name]
            assert isinstance(info, GGUFTensorInfo)
            assert info.ggml_type == t.tensor_type.name
            assert info.shape == tuple(reversed(t.shape.tolist()))
            assert (info.offset, info.nbytes) == (t.data_offset, t.n_bytes)
            assert info.n_elements == t.n_elements


def test_tiny_tensors_equal_gguf_dequantize_bit_exactly(tiny_gguf: Path) -> None:
    reader = gguf.GGUFReader(str(tiny_gguf))
    with read_gguf(tiny_gguf) as f:
        assert len(reader.tensors) == 10
        for t in reader.tensors:
            assert_same_bits(f.tensor(t.name), oracle_tensor(t), t.name)


def test_tiny_values_are_close_to_what_was_written(tiny_gguf: Path, tmp_path: Path,
                                                   make_tiny: Any) -> None:
    payloads = make_tiny(tmp_path / "again.gguf")
    with read_gguf(tiny_gguf) as f:
        np.testing.assert_array_equal(f.tensor("f32.weight").numpy(), payloads["f32"])
        err = (f.tensor("q8_0.weight") - torch.from_numpy(payloads["f32"])).abs().max()
        assert 0 < err < 0.05


def test_raw_is_a_read_only_view_of_the_tensor_bytes(tiny_gguf: Path) -> None:
    data = tiny_gguf.read_bytes()
    with read_gguf(tiny_gguf) as f:
        info = f.tensors["q4_1.weight"]
        raw = f.raw("q4_1.weight")
        assert raw.dtype == np.uint8 and raw.shape == (info.nbytes,)
        assert raw.tobytes() == data[info.offset:info.offset + info.nbytes]
        assert not raw.flags.writeable
        with pytest.raises(ValueError):
            raw[0] = 1


def test_tensor_dtype_and_independence_from_the_mapping(tiny_gguf: Path) -> None:
    with read_gguf(tiny_gguf) as f:
        ref = f.tensor("q4_1.weight")
        half = f.tensor("q4_1.weight", dtype=torch.bfloat16)
        assert half.dtype == torch.bfloat16 and torch.equal(half, ref.to(torch.bfloat16))
        ref.add_(1)  # a writable copy: must not touch the file's mapping
        assert not torch.equal(f.tensor("q4_1.weight"), ref)


def test_unknown_tensor_name_and_closed_file_raise(tiny_gguf: Path) -> None:
    f = read_gguf(tiny_gguf)
    with pytest.raises(ModelFormatError, match="no tensor named 'nope'"):
        f.tensor("nope")
    view = f.raw("f32.weight")
    f.close()
    f.close()  # idempotent
    assert view.sum() >= 0  # an outstanding view stays valid after close
    with pytest.raises(ModelFormatError, match="closed"):
        f.tensor("f32.weight")


def test_version_2_reads_like_version_3(tiny_gguf: Path, write: Any) -> None:
    data = bytearray(tiny_gguf.read_bytes())
    struct.pack_into("<I", data, 4, 2)
    with read_gguf(write(bytes(data))) as f2, read_gguf(tiny_gguf) as f3:
        assert f2.version == 2 and f3.version == 3
        assert f2.metadata == f3.metadata and f2.tensors == f3.tensors


def test_undequantisable_type_loads_but_tensor_raises(gg: Any, write: Any) -> None:
    infos = [gg.tinfo("iq", [256], 16, 0)]  # IQ2_XXS: known size, no dequantiser here
    path = write(gg.assemble([], infos, bytes(66)))
    with read_gguf(path) as f:
        assert f.tensors["iq"].ggml_type == "IQ2_XXS" and f.raw("iq").size == 66
        with pytest.raises(ModelFormatError, match="IQ2_XXS cannot be dequantised"):
            f.tensor("iq")


@pytest.mark.parametrize("change", ["truncate", "append", "rewrite-in-place"])
def test_file_changed_after_open_is_detected_before_reading(tiny_gguf: Path, write: Any,
                                                            change: str) -> None:
    """G17: the size recorded at open is checked again before each tensor read."""
    path = write(tiny_gguf.read_bytes())
    f = read_gguf(path)
    assert f.tensor("f32.weight").shape == (4, 64)
    size = path.stat().st_size
    if change == "truncate":
        os.truncate(path, size - 100)
    elif change == "append":
        with open(path, "ab") as fh:
            fh.write(b"x" * 10)
    else:  # same size, new contents: only the modification time tells
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    for read in (f.tensor, f.raw):
        with pytest.raises(ModelFormatError, match="changed on disk"):
            read("f32.weight")
    f.close()


def test_unclosed_file_is_released_without_a_resource_warning(tiny_gguf: Path) -> None:
    f = read_gguf(tiny_gguf)
    view, info = f.raw("f32.weight"), f.tensors["f32.weight"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del f
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    # the mapping outlives the closed file for as long as the view exists
    assert view.tobytes() == tiny_gguf.read_bytes()[info.offset:info.offset + info.nbytes]


# ---------------------------------------------------------------------------------------------
# the real embedded model


def test_real_file_header_and_table(real_file: GGUFFile, real_reader: Any) -> None:
    assert real_file.version == 3 and len(real_file.tensors) == len(real_reader.tensors) == 272
    assert real_file.metadata["general.architecture"] == "llama"
    emb = real_file.tensors["token_embd.weight"]
    assert emb.ggml_type == "Q8_0" and emb.shape == (49152, 576)
    for t in real_reader.tensors:
        info = real_file.tensors[t.name]
        ref = (t.tensor_type.name, t.data_offset, t.n_bytes)
        assert (info.ggml_type, info.offset, info.nbytes) == ref, t.name
        assert info.shape == tuple(reversed(t.shape.tolist()))


def test_real_file_metadata_equals_gguf_py_for_all_keys(real_file: GGUFFile,
                                                        real_reader: Any) -> None:
    values, types = oracle_metadata(real_reader)
    assert set(real_file.metadata) == set(values) and len(values) == 33
    for key in values:
        assert real_file.field_types[key] == types[key], key
        assert real_file.metadata[key] == values[key], key


def test_real_file_sample_tensors_equal_gguf_py_bit_exactly(real_file: GGUFFile,
                                                            real_reader: Any) -> None:
    by_type: dict[str, list[Any]] = {}
    for t in real_reader.tensors:
        by_type.setdefault(t.tensor_type.name, []).append(t)
    assert set(by_type) == {"Q4_1", "Q8_0", "F32"}
    sample = by_type["Q4_1"][::25] + by_type["Q8_0"] + by_type["F32"][::15]
    for t in sample:
        assert_same_bits(real_file.tensor(t.name), oracle_tensor(t), t.name)


def test_real_file_all_tensors_dequantise(real_file: GGUFFile) -> None:
    """Every tensor dequantises to its shape with finite values; prints the time it took."""
    start = time.perf_counter()
    total = 0
    for name, info in real_file.tensors.items():
        x = real_file.tensor(name)
        assert x.shape == info.shape and x.dtype == torch.float32, name
        assert bool(torch.isfinite(x).all()), name
        total += x.numel()
    elapsed = time.perf_counter() - start
    print(f"dequantised {len(real_file.tensors)} tensors, {total} values in {elapsed:.2f} s")
    assert total == 134_515_008
