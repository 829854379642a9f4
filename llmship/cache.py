"""The cache layer: stages, fingerprints of their inputs, their keys, and the stage records that say a stage's
artifact is up to date.

A stage (`Stage`) declares what it reads (config sections, fingerprints of the files it reads), the stages whose
artifacts it consumes, and how it runs; `build` reuses or rebuilds it. Its key is derived from that declaration and
nowhere else: what it reads, each consumed stage's identity (its recorded key and a fingerprint of its folder), and
the library versions. The key is recorded in `<output.dir>/.llmship/stages/<stage>.json`
only after the stage's artifact has been moved into place (atomically), so a run killed at any moment is either redone
or trusted, never half-trusted. Imports nothing from llmship but `files` and `errors`: every layer may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from llmship.files import write_atomic, write_json_atomic

# Bump when llmship's own code changes what a stage builds from the same inputs (the package version stays 0.1.0
# between such changes); 2: tokenizers get SentencePiece's dummy prefix back, which changes calibration token ids;
# 3: fused graphs carry rotary tables of twice max positions (C-Eval GEN generates past max positions);
# 4: keys derived from the stage declarations (`Stage`), a variant's from the fp32 export's identity.
STAGE_VERSION = 4
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


# --------------------------------------------------------------------------- stages
log = logging.getLogger("llmship")


@dataclass(eq=False)
class Stage:
    """One unit of the chain: the record it keeps, the folder it writes, what it reads, the stages it consumes, and
    how it runs. `run` builds `artifact` atomically and returns what the record keeps (a stage result)."""

    name: str                                   # its record: .llmship/stages/<name>.json
    artifact: Path
    reads: Callable[[], dict[str, Any]]         # config sections and input-file fingerprints (called once, lazily)
    run: Callable[[], Any]
    consumes: Mapping[str, Stage] = field(default_factory=dict)  # the stages whose artifacts it reads, by role
    fresh_log: str = ""                         # logged when it is up to date, e.g. "fp32 export is up to date"
    reuse: Callable[[Any], Any] | None = None   # what a stored result becomes when the stage is up to date

    @cached_property
    def inputs(self) -> dict[str, Any]:
        return self.reads()

    def key(self, out: Path) -> str:
        """A fingerprint of everything the stage reads; the consumed stages' identities are taken when it is asked
        for, so after they were built."""
        consumed = {role: stage.identity(out) for role, stage in self.consumes.items()}
        return stage_key(self.name, self.inputs, consumed)

    def identity(self, out: Path) -> str:
        """What a consumer's key holds of this stage: its recorded key and a fingerprint of its folder's files, so a
        folder changed on disk after its build (replaced, edited, corrupted) is read again, not served from a cache."""
        try:
            recorded = load_record(out, self.name)["key"]
        except (OSError, json.JSONDecodeError, KeyError):
            recorded = None
        return f"{recorded}:{folder_fingerprint(self.artifact)}"

    def up_to_date(self, out: Path) -> bool:
        return cached(out, self.name, self.key(out), self.artifact)


def build(stage: Stage, out: Path, force: bool = False) -> Any:
    """The stage's result: the stored one when its record matches its key (re-derived by `reuse`, and recorded again
    when that changes it), else a new build, recorded once its artifact is in place."""
    key = stage.key(out)
    if not force and cached(out, stage.name, key, stage.artifact):
        log.info("%s: %s", stage.fresh_log or f"{stage.name} is up to date", stage.artifact)
        stored = load_record(out, stage.name)["result"]
        if stage.reuse is None:
            return stored
        result = stage.reuse(stored)
        if result is not stored:
            record(out, stage.name, key, stage.artifact, result)
        return result
    with rebuilding(out, stage.name):
        result = stage.run()
    record(out, stage.name, key, stage.artifact, result)
    return result
