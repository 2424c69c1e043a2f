"""The reader accepts exactly the headers the safetensors library accepts (the library is the
reference), and reads the same values; its one extra refusal is a tensor named twice."""

import json
import struct

import numpy as np
import pytest
from safetensors import SafetensorError, safe_open

from covenant_jax.convert.safetensors_io import SafetensorsFile
from covenant_jax.errors import SafetensorsError

DATA = np.arange(4, dtype=np.float32).tobytes()  # 16 bytes


def _entry(shape, offsets, dtype="F32"):
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def _header(**entries):
    return json.dumps(entries)


# name -> (header text, data bytes, the tensor or word the message must name)
CASES = {
    "one tensor": (_header(a=_entry([4], [0, 16])), DATA, None),
    "out of order on disk": (_header(b=_entry([2], [8, 16]), a=_entry([2], [0, 8])), DATA, None),
    "empty and scalar tensors": (
        _header(z=_entry([0], [16, 16]), s=_entry([], [0, 4]), a=_entry([3], [4, 16])),
        DATA,
        None,
    ),
    "metadata null": ('{"__metadata__": null, "a": ' + json.dumps(_entry([4], [0, 16])) + "}", DATA, None),
    "unknown entry field": (_header(a={**_entry([4], [0, 16]), "extra": 1}), DATA, None),
    "padded with spaces": (_header(a=_entry([4], [0, 16])) + "   ", DATA, None),
    "no tensors, no data": ("{}", b"", None),
    "negative offset": (_header(a=_entry([4], [-16, 0])), DATA, "'a'"),
    "offsets reach back into the header": (
        _header(a=_entry([2], [0, 8]), b=_entry([2], [-8, 0])),
        DATA,
        "'b'",
    ),
    "three offsets": (_header(a=_entry([4], [0, 16, 16])), DATA, "'a'"),
    "string offsets": (_header(a=_entry([4], ["0", "16"])), DATA, "'a'"),
    "overlap": (_header(a=_entry([2], [0, 8]), b=_entry([3], [4, 16])), DATA, "'b'"),
    "same bytes twice": (
        _header(a=_entry([2], [0, 8]), b=_entry([2], [0, 8]), c=_entry([2], [8, 16])),
        DATA,
        "overlaps",
    ),
    "gap": (_header(a=_entry([1], [0, 4]), b=_entry([2], [8, 16])), DATA, "'b'"),
    "does not start at 0": (_header(a=_entry([2], [8, 16])), DATA, "'a'"),
    "bytes after the last tensor": (_header(a=_entry([3], [0, 12])), DATA, "after the last tensor"),
    "no tensors, some data": ("{}", DATA, "after the last tensor"),
    "truncated": (_header(a=_entry([4], [0, 16])), DATA[:12], "truncated"),
    "size disagrees with shape": (_header(a=_entry([3], [0, 16])), DATA, "'a'"),
    "negative dim": (_header(a=_entry([-4], [0, 16])), DATA, "'a'"),
    "float dim": (_header(a=_entry([4.0], [0, 16])), DATA, "'a'"),
    "bool dim": (_header(a=_entry([True], [0, 4]), b=_entry([3], [4, 16])), DATA, "'a'"),
    "unknown dtype": (_header(a=_entry([4], [0, 16], "F33")), DATA, "'a'"),
    "missing field": (_header(a={"dtype": "F32", "shape": [4]}), DATA, "'a'"),
    "entry not an object": (_header(a=[1]), DATA, "'a'"),
    "header a list": ("[1, 2]", DATA, "not a JSON object"),
    "header a string": ('"a"', DATA, "not a JSON object"),
    "metadata not str to str": (
        '{"__metadata__": {"x": 1}, "a": ' + json.dumps(_entry([4], [0, 16])) + "}",
        DATA,
        "__metadata__",
    ),
    "metadata a list": (
        '{"__metadata__": ["x"], "a": ' + json.dumps(_entry([4], [0, 16])) + "}",
        DATA,
        "__metadata__",
    ),
    "NaN in header": (
        '{"__metadata__": {"x": NaN}, "a": ' + json.dumps(_entry([4], [0, 16])) + "}",
        DATA,
        "corrupt header",
    ),
    "NUL padding": (_header(a=_entry([4], [0, 16])) + "\0\0", DATA, "corrupt header"),
    "not UTF-8": (b'{"a\xff": ' + json.dumps(_entry([4], [0, 16])).encode() + b"}", DATA, "corrupt header"),
}


def _write(path, header: str | bytes, data: bytes):
    blob = header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _library_reads(path):
    try:
        with safe_open(str(path), "np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError:
        return None


@pytest.mark.parametrize("case", list(CASES))
def test_accepts_exactly_what_the_library_accepts(tmp_path, case):
    header, data, named = CASES[case]
    path = _write(tmp_path / "x.safetensors", header, data)
    reference = _library_reads(path)
    if reference is None:
        with pytest.raises(SafetensorsError) as e:
            SafetensorsFile(path)
        message = str(e.value)
        assert message.startswith(f"{path}: ") and named in message and "\n" not in message
    else:
        file = SafetensorsFile(path)
        assert sorted(file.keys()) == sorted(reference)
        for name, want in reference.items():
            np.testing.assert_array_equal(np.asarray(file.tensor(name)), want)


def test_a_tensor_named_twice_is_refused(tmp_path):
    """The library keeps the last of two same-named entries; a header that names a tensor twice
    is ambiguous, so the reader refuses it even when both entries agree."""
    entry = json.dumps(_entry([4], [0, 16]))
    path = _write(tmp_path / "x.safetensors", f'{{"a": {entry}, "a": {entry}}}', DATA)
    with pytest.raises(SafetensorsError, match="'a' appears twice in the header"):
        SafetensorsFile(path)
