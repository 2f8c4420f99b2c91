"""Hostile adapter files: malformed safetensors headers and adapter configs, each with the error it must raise.
Shared by tests/test_cpp_reader.py (every case refused with a clear error) and tests/fuzz/make_corpus.py (the
fuzzers' seed corpus)."""

import json
import struct

import torch

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def write(path, header, data=b"", length=None):
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if length is None else length) + h + data)
    return str(path)


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}


BAD = {
    "tiny file": (None, "expected at least 8 bytes"),
    "header length overflow": ((GOOD, bytes(16), 2**63), "header length"),
    "header longer than file": ((GOOD, bytes(16), 10**6), "header length"),
    "bad json": ((b"{not json", bytes(16)), "not valid JSON"),
    "not an object": (([1, 2], b""), "JSON object"),
    "unknown dtype": (({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)), "unknown dtype F33"),
    "offsets out of range": (
        ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8)),
        "outside the data section",
    ),
    "reversed offsets": (({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, bytes(8)), "outside"),
    "size mismatch": (({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, bytes(16)), "needs 12 bytes"),
    "overflowing shape": (
        ({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}}, bytes(16)),
        "overflowing",
    ),
    "negative dim": (({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)), "non-negative"),
    "missing field": (({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)), "data_offsets"),
    "overlap": (
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            bytes(12),
        ),
        "overlap",
    ),
    "bad metadata": (({"__metadata__": {"x": 1}}, b""), "__metadata__"),
}


BAD_CONFIGS = [
    ("{", "not valid JSON"),
    ('{"rank_pattern": [1]}', "wrong type"),
    ('{"peft_type": "LORA", "use_dora": true}', "use_dora"),
    ('{"peft_type": "LORA", "r": "eight"}', "wrong type"),
    ('{"peft_type": "IA3"}', "peft_type"),
    ('{"r": 0}', "r >= 1"),
    ('{"r": 1e300}', "integer rank"),  # was undefined behaviour (float -> int64 out of range)
    ('{"r": 8.5}', "integer rank"),
    ('{"rank_pattern": {"q": 1e300}}', "integer rank"),
    ('{"rank_pattern": {"q": 2, "v": 0}}', 'rank_pattern ranks >= 1, got 0 for "v"'),  # was an infinite scaling
    ('{"rank_pattern": {"e**********************mb": 1}}', "multiple repeat"),  # std::regex took minutes on it
    ('{"alpha_pattern": {"q+{2}": 1}}', "multiple repeat"),
]
