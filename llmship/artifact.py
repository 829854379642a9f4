"""A compiled variant: a folder that stands on its own (model.onnx [+ .data], tokenizer, config.json,
generation_config.json, manifest.json), and the atomic folder write every stage uses to produce one.

Atomic write: the folder is built in a sibling `<target>.tmp-<pid>`, every file fsynced, then swapped in
with renames, so a failed or killed run leaves the earlier output as it was (at worst parked as
`<target>.old-<pid>`, which the next write puts back before starting).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmship.cache import library_versions
from llmship.errors import UserError
from llmship.files import MANIFEST_FILE, MODEL_FILE, folder_size, fsync_file, model_size, read_json_object, write_json_atomic

FORMAT = 1  # bump when the folder layout changes incompatibly


@dataclass
class Artifact:
    """A compiled folder and its manifest."""

    path: Path
    manifest: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        folder = Path(path)
        if not folder.is_dir():
            raise UserError("compiled folder not found", where=str(folder))
        file = folder / MANIFEST_FILE
        if not file.is_file():
            raise UserError("not an llmship artifact (no manifest.json); compile it with `llmship compile`", where=str(folder))
        try:
            manifest = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"manifest.json is unreadable: {exc}", where=str(file)) from None
        if not isinstance(manifest, dict) or "llmship" not in manifest:
            raise UserError("not an llmship artifact (manifest.json lacks the 'llmship' section)", where=str(file))
        if not (folder / manifest.get("onnx", {}).get("file", MODEL_FILE)).is_file():
            raise UserError("the artifact's model.onnx is missing", where=str(folder))
        return cls(folder, manifest)

    @property
    def onnx_path(self) -> Path:
        return self.path / self.manifest.get("onnx", {}).get("file", MODEL_FILE)


def read_config_json(folder: str | Path) -> dict[str, Any]:
    """A model or compiled folder's config.json ({} when absent); an unreadable one is a UserError naming it."""
    return read_json_object(Path(folder) / "config.json")


def max_positions(model: Any, folders: Any) -> int:
    """Smallest max_position_embeddings among the source model (`model`: a ModelConfig) and the compiled folders;
    the hub's config when none of them is local."""
    from llmship.source import resolve_model_path

    source = Path(resolve_model_path(model.path)).expanduser()
    found = [int(v) for folder in (source, *folders) if (v := read_config_json(folder).get("max_position_embeddings"))]
    if not found:
        from transformers import AutoConfig

        found.append(int(AutoConfig.from_pretrained(model.path, revision=model.revision).max_position_embeddings))
    return min(found)


def new_manifest(kind: str, **sections: Any) -> dict[str, Any]:
    """Manifest skeleton: llmship section (format, version, kind, time) and library versions, plus `sections`."""
    versions = library_versions()
    return {
        "llmship": {"format": FORMAT, "version": versions.get("llmship", "unknown"), "kind": kind,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "libraries": versions,
        **sections,
    }


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> Path:
    """Write manifest.json (size fields filled in last, so they count every other file)."""
    folder = Path(folder)
    manifest = dict(manifest)
    manifest["size_bytes"] = folder_size(folder) - ((folder / MANIFEST_FILE).stat().st_size if (folder / MANIFEST_FILE).exists() else 0)
    manifest["model_bytes"] = model_size(folder)
    return write_json_atomic(folder / MANIFEST_FILE, manifest, durable=True)


# --------------------------------------------------------------------------- atomic folder writes
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _suffix_pid(path: Path, marker: str) -> int | None:
    tail = path.name.rpartition(marker)[2]
    return int(tail) if tail.isdigit() else None


def _recover(target: Path) -> None:
    """Undo what a killed writer left: put a parked earlier output back, drop dead temp folders."""
    parent = target.parent
    for old in parent.glob(f"{target.name}.old-*"):
        pid = _suffix_pid(old, ".old-")
        if pid is None or _pid_alive(pid):
            continue
        if not target.exists():
            os.replace(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in parent.glob(f"{target.name}.tmp-*"):
        pid = _suffix_pid(tmp, ".tmp-")
        if pid is not None and not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def recover_interrupted(folder: str | Path) -> None:
    """Repair every output under `folder` that a killed writer left half-swapped or half-built."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    targets = {p.name.rpartition(marker)[0] for p in folder.iterdir() for marker in (".tmp-", ".old-") if marker in p.name}
    for name in sorted(targets):
        _recover(folder / name)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            fsync_file(p)
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Build a folder in a fresh temp sibling and swap it in only when the block succeeds.

    Never writes into `target` itself, so no stale file (e.g. a half-written model.onnx.data) is ever
    appended to; on an exception the temp folder is removed and `target` is untouched.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover(target)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def swap_in(built: Path, target: Path) -> None:
    """Replace `target` by `built` (directories): park the old one, rename, then delete the parked copy."""
    parked = None
    if target.exists():
        parked = target.with_name(f"{target.name}.old-{os.getpid()}")
        shutil.rmtree(parked, ignore_errors=True)
        os.replace(target, parked)
    os.replace(built, target)
    with contextlib.suppress(OSError):
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    if parked is not None:
        shutil.rmtree(parked, ignore_errors=True)
