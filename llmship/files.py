"""One home for the names of the files a compiled folder holds, the protobuf size limit, and the atomic writes and
JSON reads every stage uses. Imports nothing from llmship but `errors`, so any layer may use it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmship.errors import UserError

MODEL_FILE = "model.onnx"
MODEL_DATA_FILE = "model.onnx.data"
MANIFEST_FILE = "manifest.json"
GENAI_CONFIG_FILE = "genai_config.json"
CONFIG_FILE = "config.json"

# protobuf refuses messages of 2 GiB or more (its int32 sizes); a model whose weights reach this, less headroom for
# the graph itself, must keep its weights in an external data file.
PROTOBUF_LIMIT = 2 * 1024**3
GRAPH_HEADROOM = 64 * 1024**2
INLINE_WEIGHTS_LIMIT = PROTOBUF_LIMIT - GRAPH_HEADROOM


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def write_atomic(path: str | Path, data: str | bytes, *, durable: bool = False) -> Path:
    """Write `data` (text as UTF-8) to a hidden sibling, then rename it over `path`: a reader sees the old file or the
    new one, never half of one. `durable` fsyncs before the rename (files a later step trusts after a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomic(path: str | Path, data: Any, *, indent: int | None = 2, durable: bool = False) -> Path:
    """`data` as UTF-8 JSON (non-ASCII kept, unknown types as str), written atomically."""
    text = json.dumps(data, indent=indent, ensure_ascii=False, default=str)
    return write_atomic(path, text + ("\n" if indent else ""), durable=durable)


def read_json_object(file: str | Path) -> dict[str, Any]:
    """A JSON object file ({} when absent); an unreadable one, or one that is not an object, is a UserError naming it."""
    file = Path(file)
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"unreadable JSON ({exc})", where=str(file)) from None
    if not isinstance(data, dict):
        raise UserError(f"expected a JSON object, got {type(data).__name__}", where=str(file))
    return data


def folder_size(path: str | Path) -> int:
    """Bytes of every file under `path` (the manifest included)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def model_size(path: str | Path) -> int:
    """Bytes of the graph and its external data only (what a size ratio compares)."""
    folder = Path(path)
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and (p.suffix == ".onnx" or p.name.endswith(".onnx.data")))
