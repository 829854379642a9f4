"""The cache layer: fingerprints of a stage's inputs, its key, and the stage records that say a stage's artifact is
up to date.

A stage's key is a fingerprint of its inputs: the source model's files, the config sections the stage reads, the keys
of the stages it consumes, and the library versions. The key is recorded in `<output.dir>/.llmship/stages/<stage>.json`
only after the stage's artifact has been moved into place (atomically), so a run killed at any moment is either redone
or trusted, never half-trusted. Imports nothing from llmship but `files` and `errors`: every layer may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmship.files import write_atomic, write_json_atomic

# Bump when llmship's own code changes what a stage builds from the same inputs (the package version stays 0.1.0
# between such changes); 2: tokenizers get SentencePiece's dummy prefix back, which changes calibration token ids;
# 3: fused graphs carry rotary tables of twice max positions (C-Eval GEN generates past max positions).
STAGE_VERSION = 3
LIBRARIES = ("llmship", "torch", "transformers", "onnx", "onnxruntime", "onnxscript", "sentencepiece", "numpy")


# --------------------------------------------------------------------------- fingerprints
def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def _hash_file(path: Path, digest: Any) -> None:
    # Large weight files: size + mtime + head/tail bytes; a full hash of a 13 GB checkpoint costs a minute per run.
    stat = path.stat()
    digest.update(f"{path.name}:{stat.st_size}".encode())
    with path.open("rb") as fh:
        if stat.st_size <= 64 << 20:
            digest.update(fh.read())
        else:
            digest.update(str(stat.st_mtime_ns).encode())
            digest.update(fh.read(1 << 20))
            fh.seek(-(1 << 20), 2)
            digest.update(fh.read())


def folder_fingerprint(path: str | Path) -> str:
    """Hash of a local model/adapter folder's files (a hub id hashes as its name)."""
    folder = Path(path)
    digest = hashlib.sha256()
    if not folder.exists():
        digest.update(str(path).encode())
        return digest.hexdigest()[:16]
    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else [folder]
    for file in files:
        digest.update(str(file.relative_to(folder) if folder.is_dir() else file.name).encode())
        _hash_file(file, digest)
    return digest.hexdigest()[:16]


def stage_key(*parts: Any) -> str:
    blob = json.dumps([*parts, library_versions(), STAGE_VERSION], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- stage index
# Stage records hold paths relative to output.dir, so a moved or copied output folder is still trusted: the
# artifact as a relative path, and every path under output.dir inside a stored result with this token in front.
OUTPUT_DIR_TOKEN = "${output.dir}"


def _index_path(out: Path, stage: str) -> Path:
    return out / ".llmship" / "stages" / f"{stage}.json"


def _relative(path: Path, out: Path) -> str:
    """`path` relative to output.dir when it lies inside it (else absolute)."""
    try:
        return Path(path).resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def _recorded_artifact(record: dict, out: Path) -> Path | None:
    """The artifact a record names, under this output.dir (records of older versions hold absolute paths)."""
    artifact = record.get("artifact")
    return out / artifact if isinstance(artifact, str) else None


def _portable(value: Any, out: Path) -> Any:
    """A stored result with every absolute path under output.dir written as OUTPUT_DIR_TOKEN/<relative path>."""
    if isinstance(value, dict):
        return {k: _portable(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v, out) for v in value]
    if isinstance(value, str):
        # the stages write output.dir as given, made absolute, or resolved
        for root in dict.fromkeys((str(out.resolve()), str(out.absolute()), str(out))):
            if value.startswith(root) and value[len(root):len(root) + 1] in ("", "/"):
                return OUTPUT_DIR_TOKEN + value[len(root):]
    return value


def _located(value: Any, out: Path) -> Any:
    """The inverse of `_portable`: the token replaced by this run's output.dir."""
    if isinstance(value, dict):
        return {k: _located(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_located(v, out) for v in value]
    if isinstance(value, str) and value.startswith(OUTPUT_DIR_TOKEN):
        return str(out.resolve()) + value[len(OUTPUT_DIR_TOKEN):]
    return value


def cached(out: Path, stage: str, key: str, artifact: Path) -> bool:
    """True when `stage` finished before with the same key and its artifact is still there."""
    index = _index_path(out, stage)
    if not index.is_file() or not artifact.exists():
        return False
    try:
        record = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    recorded = _recorded_artifact(record, out)
    return record.get("key") == key and recorded is not None and recorded.resolve() == artifact.resolve()


def _identity(path: Path) -> tuple[int, int] | None:
    """Inode and change time: an atomic swap puts a different folder in place; a failed build touches neither."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_ctime_ns


@contextmanager
def rebuilding(out: Path, stage: str):
    """Drop a stage's record while its output is rebuilt: a run killed between the swap of the new folder and the
    new record must not leave the old key pointing at the new folder. A build that fails with an exception before
    its swap leaves the earlier folder in place (atomic writes; same inode), so its record is put back."""
    index = _index_path(out, stage)
    try:
        saved = index.read_bytes()
        artifact = _recorded_artifact(json.loads(saved), out)
        before = _identity(artifact)
    except (OSError, ValueError, KeyError, TypeError):
        saved, artifact, before = None, None, None
    with contextlib.suppress(FileNotFoundError):
        index.unlink()
    try:
        yield
    except BaseException:
        untouched = artifact is not None and before is not None and _identity(artifact) == before
        if saved is not None and untouched and not index.exists():
            write_atomic(index, saved)
        raise


def record(out: Path, stage: str, key: str, artifact: Path, result: Any = None) -> None:
    write_json_atomic(_index_path(out, stage), {"key": key, "artifact": _relative(artifact, out),
                                                 "result": _portable(result, out)})


def load_record(out: Path, stage: str) -> dict:
    """A stage's record, its result's paths under this output.dir."""
    stored = json.loads(_index_path(out, stage).read_text(encoding="utf-8"))
    return {**stored, "result": _located(stored.get("result"), out)}
