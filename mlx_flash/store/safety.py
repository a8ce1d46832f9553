"""Checks on files of untrusted origin, run before anything large is read or allocated.

A store (or a source model) may come from anywhere. Its small JSON files are read with
a size cap, and the safetensors headers are checked here, in Python, before MLX maps a
byte: MLX itself silently cuts shapes to 32 bits (a header claiming 2**62 + 4 floats
loads as 4) and accepts overlapping tensors. Keys that name files must stay inside the
directory, and nothing may ask for the model's own code to be run.
"""

import json
import math
import struct
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from ..errors import FlashError

MAX_JSON_BYTES = 64 << 20  # the largest manifest / config / tokenizer config accepted
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit
MAX_DIM = (1 << 31) - 1  # MLX shapes are int32
SAFETENSORS_DTYPES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}
CODE_KEYS = ("auto_map", "model_file")  # code that transformers / mlx-lm would run
_RECONVERT = "convert the model again with `python -m mlx_flash.convert`"


def read_json(path: Path, fix: str = _RECONVERT) -> object:
    """A small JSON file, parsed: anything else (too big, not UTF-8, not JSON, nested
    too deep, an integer of too many digits) is a `FlashError`."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise FlashError(
                f"{size} bytes is too large for this file (at most {MAX_JSON_BYTES})",
                path,
                fix,
            )
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except OSError as e:
        raise FlashError(f"cannot read the file ({e.strerror})", path, fix) from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise FlashError(f"not valid JSON ({e})", path, fix) from None


def read_json_object(path: Path, fix: str = _RECONVERT) -> dict:
    d = read_json(path, fix)
    if not isinstance(d, dict):
        raise FlashError("expected a JSON object", path, fix)
    return d


def file_keys(obj: object, where: str = "") -> Iterator[Tuple[str, object]]:
    """(dotted key, value) of every key anywhere in `obj` that names a file."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = f"{where}.{k}" if where else str(k)
            name = str(k)
            if "name_or_path" not in name and name.endswith(
                ("_file", "_files", "_path", "_dir")
            ):
                yield key, v
            yield from file_keys(v, key)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from file_keys(v, f"{where}[{i}]")


def escaping(root: Path, value: object) -> List[str]:
    """The file names in `value` (a string or a list of them) that leave `root`."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list):
        return []
    out = []
    for name in names:
        if not isinstance(name, str):
            continue
        try:
            p = Path(name)
            inside = (root / p).resolve(strict=False)
            ok = not p.is_absolute() and ".." not in p.parts
            ok = ok and inside.is_relative_to(root)
        except (ValueError, OSError):  # a NUL byte, a symlink loop
            ok = False
        if not ok:
            out.append(name)
    return out


def check_model_files(directory: Path, names=("config.json", "tokenizer_config.json")):
    """Refuse a directory whose configs ask for code to be run or name files outside.

    mlx_flash never runs a model's own code: `model_file` (mlx-lm) and `auto_map`
    (transformers, which would otherwise prompt to run it) are refused, so the
    tokenizer is never asked to trust remote code.
    """
    directory = Path(directory)
    root = directory.resolve()
    for name in names:
        path = directory / name
        if not path.is_file():
            continue
        d = read_json(path)
        if isinstance(d, dict):
            for key in CODE_KEYS:
                if key in d:
                    raise FlashError(
                        f"{key!r} asks to run the model's own code: mlx_flash never "
                        "runs code from a model",
                        path,
                        f"remove {key!r} (the architectures mlx_flash supports need "
                        "no custom code) or convert the model again",
                    )
        for key, value in file_keys(d):
            bad = escaping(root, value)
            if bad:
                raise FlashError(
                    f"{key} names {bad[0]!r}, a file outside {directory}",
                    path,
                    f"remove {key!r} or convert the model again",
                )


def clean_config(d: dict, directory: Path) -> dict:
    """`d` without code keys and without file names that leave `directory`: what a
    converter writes, so that its stores pass `check_model_files`."""
    root = Path(directory).resolve()

    def clean(obj, top):
        if isinstance(obj, dict):
            return {
                k: clean(v, False)
                for k, v in obj.items()
                if not (top and k in CODE_KEYS)
                and not (
                    "name_or_path" not in str(k)
                    and str(k).endswith(("_file", "_files", "_path", "_dir"))
                    and escaping(root, v)
                )
            }
        if isinstance(obj, list):
            return [clean(v, False) for v in obj]
        return obj

    return clean(d, True)


def check_safetensors(
    path: Path, fix: str = _RECONVERT
) -> Dict[str, Tuple[str, list, int]]:
    """Check a safetensors file's header against its size before MLX maps it, and
    return each tensor's (dtype, shape, offset of its first byte in the file).

    Every tensor must have a known dtype, a shape of non-negative int32 dimensions,
    and exactly `prod(shape) * itemsize` bytes inside the data section, with no two
    tensors sharing bytes.
    """
    path = Path(path)

    def bad(why):
        return FlashError(f"corrupt safetensors file: {why}", path, fix)

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise bad(f"a header of {n} bytes in a file of {size}")
            raw = f.read(n)
    except OSError as e:
        raise FlashError(f"cannot read the file ({e.strerror})", path, fix) from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise bad(f"the header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    data, spans = size - 8 - n, []
    for name, t in header.items():
        if name == "__metadata__":  # MLX writes null when there is none
            meta = {} if t is None else t
            if not isinstance(meta, dict) or not all(
                isinstance(v, str) for v in meta.values()
            ):
                raise bad("__metadata__ must map strings to strings")
            continue
        if not isinstance(t, dict) or set(t) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r}: expected dtype, shape and data_offsets")
        dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise bad(f"tensor {name!r}: unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            type(d) is int and 0 <= d <= MAX_DIM for d in shape
        ):
            raise bad(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data
        ):
            raise bad(f"tensor {name!r}: data offsets {offsets!r} outside the file")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            raise bad(
                f"tensor {name!r}: shape {shape} needs {nbytes} bytes, the file "
                f"gives it {offsets[1] - offsets[0]}"
            )
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise bad(f"tensors {a!r} and {b!r} share bytes")
    return {
        name: (t["dtype"], t["shape"], 8 + n + t["data_offsets"][0])
        for name, t in header.items()
        if name != "__metadata__"
    }
