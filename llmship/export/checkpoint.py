"""Checkpoint readers that hand out one tensor at a time (the streaming compile's only view of the weights).

Formats: sharded safetensors with `model.safetensors.index.json` and single `model.safetensors` (memory-mapped
through `safetensors.safe_open`), `pytorch_model*.bin` shards with or without an index (`torch.load(mmap=True,
weights_only=True)`: LLaMA 1 era and many merged Chinese-LLaMA-Alpaca releases). Tensors may be bf16, fp16 or
fp32; `tensor(name)` returns an fp32 copy of that one tensor.

`open_checkpoint` validates everything before any expensive step: every shard the index names exists and holds
the tensors the index says it does, no safetensors shard is truncated, every tensor is floating point, every
tensor the LLaMA graph needs is present with the shape config.json implies. Each problem is a `UserError` naming
the file and tensor.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmship.errors import UserError

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
# safetensors header dtype names (and torch dtypes) the graph can take; anything else is not a weight.
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Buffers some old checkpoints saved beside the weights; the graph recomputes them.
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")
# A header larger than this is corrupt (safetensors' own limit is 100 MB).
MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str          # safetensors dtype name (F32, F16, BF16, ...) or str(torch dtype) for .bin
    shape: tuple[int, ...]

    @property
    def nbytes_fp32(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return 4 * n


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor a LlamaForCausalLM of this config.json holds, with its shape (lm_head absent when tied)."""
    hidden = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    vocab = config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden), p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden), p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _safetensors_header(file: Path) -> dict[str, Any]:
    """The header of a .safetensors file, checked against the file size (a truncated download fails here)."""
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise UserError("shard is empty or truncated", where=str(file))
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER:
                raise UserError("shard header is corrupt or the file is truncated", where=str(file))
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"shard header is unreadable ({str(exc).splitlines()[0][:200]})", where=str(file)) from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if size < 8 + n + end:
        last = max(header, key=lambda k: header[k]["data_offsets"][1])
        raise UserError(f"shard is truncated ({size} of {8 + n + end} bytes; tensor {last} is cut)", where=str(file))
    return header


def _bin_state(file: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt zip/pickle surfaces as many types
        raise UserError(f"shard is unreadable or truncated ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})",
                        where=str(file)) from None
    if not isinstance(state, dict):
        raise UserError("shard does not hold a state dict", where=str(file))
    return state


class Checkpoint:
    """A validated checkpoint folder: names, shapes and dtypes of its tensors, read one at a time."""

    def __init__(self, folder: Path, config: dict[str, Any], entries: dict[str, TensorEntry]):
        self.folder = folder
        self.config = config
        self.entries = entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[self._alias(name)].shape

    def _alias(self, name: str) -> str:
        # Tied embeddings: the output projection reads the input table.
        if name == "lm_head.weight" and name not in self.entries:
            return "model.embed_tokens.weight"
        return name

    def tensor(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """An fp32 copy of one tensor, or of its `rows` only (the rest is never read). The shard is mapped for this
        read only: pages of a mapping left open would count in the resident memory up to the whole shard."""
        name = self._alias(name)
        entry = self.entries[name]
        if entry.file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(entry.file), framework="pt") as handle:
                value = handle.get_tensor(name) if rows is None else handle.get_slice(name)[rows]
        else:
            value = _bin_state(entry.file)[name]
            value = value if rows is None else value[rows]
        return value.to(torch.float32, copy=True)

    def rows(self, name: str, indices: list[int]) -> torch.Tensor:
        """fp32 copies of some rows of one tensor (an embedding lookup), read in one opening of its shard."""
        name = self._alias(name)
        entry = self.entries[name]
        if entry.file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(entry.file), framework="pt") as handle:
                table = handle.get_slice(name)
                picked = [table[index:index + 1] for index in indices]
        else:
            state = _bin_state(entry.file)[name]
            picked = [state[index:index + 1] for index in indices]
        return torch.cat(picked).to(torch.float32) if picked else torch.zeros((0, *entry.shape[1:]))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Copy one tensor into `out`, converted to its dtype in the copy (no fp32 temporary)."""
        name = self._alias(name)
        entry = self.entries[name]
        if entry.file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(entry.file), framework="pt") as handle:
                return out.copy_(handle.get_tensor(name))
        return out.copy_(_bin_state(entry.file)[name])

    @property
    def weight_bytes(self) -> int:
        """Bytes of the checkpoint's tensors in fp32."""
        return sum(e.nbytes_fp32 for e in self.entries.values())


def _shard_files(folder: Path) -> tuple[list[Path], dict[str, str] | None, Path | None]:
    """(shard files, index weight_map or None, index file) of a model folder; UserError when there are no weights."""
    for name in INDEX_FILES:
        index_file = folder / name
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UserError(f"weight index is unreadable: {str(exc)[:200]}", where=str(index_file)) from None
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if not (folder / shard).is_file():
                    tensor = next(t for t, s in weight_map.items() if s == shard)
                    raise UserError(f"shard {shard} named by the index (e.g. for tensor {tensor}) is missing",
                                    where=str(folder / shard))
            return [folder / s for s in shards], weight_map, index_file
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name], None, None
    shards = sorted(folder.glob("pytorch_model-*.bin")) or sorted(folder.glob("model-*.safetensors"))
    if shards:
        return shards, None, None
    raise UserError(f"no weights in the model folder (expected one of {', '.join(INDEX_FILES + SINGLE_FILES)})",
                    where=str(folder))


def _entries_of(file: Path) -> dict[str, TensorEntry]:
    if file.suffix == ".safetensors":
        header = _safetensors_header(file)
        return {k: TensorEntry(file, v["dtype"], tuple(v["shape"])) for k, v in header.items()}
    state = _bin_state(file)
    entries = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"tensor {key} is not a tensor ({type(value).__name__})", where=str(file))
        name = next((k for k, d in FLOAT_DTYPES.items() if d == value.dtype), str(value.dtype))
        entries[key] = TensorEntry(file, name, tuple(value.shape))
    return entries


def open_checkpoint(folder: str | Path, config: dict[str, Any]) -> Checkpoint:
    """Validate a model folder's weights against its config.json (see the module doc) and return the reader."""
    folder = Path(folder)
    files, weight_map, index_file = _shard_files(folder)
    entries: dict[str, TensorEntry] = {}
    for file in files:
        found = _entries_of(file)
        if weight_map is not None:
            for tensor, shard in weight_map.items():
                if folder / shard == file and tensor not in found:
                    raise UserError(f"the index names tensor {tensor} in shard {shard}, which does not hold it",
                                    where=str(index_file))
        entries.update(found)
    entries = {k: v for k, v in entries.items() if not IGNORED.match(k)}
    for name, entry in entries.items():
        if entry.dtype not in FLOAT_DTYPES:
            raise UserError(f"tensor {name} is {entry.dtype}, not a float tensor (bf16, fp16 or fp32 expected)",
                            where=str(entry.file))
    expected = expected_shapes(config)
    for name, shape in expected.items():
        entry = entries.get(name)
        if entry is None:
            raise UserError(f"tensor {name} is in no shard of the checkpoint", where=str(index_file or folder))
        if entry.shape != shape:
            raise UserError(f"tensor {name} has shape {list(entry.shape)}, config.json implies {list(shape)}",
                            where=str(entry.file))
    extra = sorted(set(entries) - set(expected) - {"lm_head.weight"})
    if extra:
        raise UserError(f"tensor {extra[0]} is not part of a LLaMA model of this config.json "
                        f"({len(extra)} unexpected tensor(s))", where=str(entries[extra[0]].file))
    if "lm_head.weight" in entries and entries["lm_head.weight"].shape != expected["model.embed_tokens.weight"]:
        raise UserError(f"tensor lm_head.weight has shape {list(entries['lm_head.weight'].shape)}, config.json implies "
                        f"{list(expected['model.embed_tokens.weight'])}", where=str(entries["lm_head.weight"].file))
    return Checkpoint(folder, config, entries)


class LoraMerged:
    """A checkpoint seen through a PEFT LoRA adapter, merged one tensor at a time as PEFT's merge_and_unload does:
    W + scaling * (B @ A) per target module (scaling = lora_alpha / r, or / sqrt(r) with rslora), and the adapter's
    `modules_to_save` tensors (embed_tokens, lm_head of an extended vocabulary) in place of the base's."""

    def __init__(self, base: Checkpoint, adapter_dir: str | Path):
        from llmship.source import _adapter_state, _module_key

        adapter_dir = Path(adapter_dir)
        where = str(adapter_dir / "adapter_config.json")
        try:
            settings = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"adapter_config.json is missing or not valid JSON ({str(exc)[:120]})", where=where) from None
        if str(settings.get("peft_type", "LORA")).upper() != "LORA":
            raise UserError(f"only LoRA adapters are supported, this one is {settings.get('peft_type')}", where=where)
        for key in ("rank_pattern", "alpha_pattern"):
            if settings.get(key):
                raise UserError(f"per-module {key} is not supported by the streaming merge", where=where)
        if settings.get("fan_in_fan_out"):
            raise UserError("fan_in_fan_out adapters (GPT-2 style Conv1D) do not fit LLaMA", where=where)
        rank, alpha = int(settings.get("r", 8)), float(settings.get("lora_alpha", 8))
        self.scaling = alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank
        self.base = base
        self.lora: dict[str, dict[str, torch.Tensor]] = {}
        self.full: dict[str, torch.Tensor] = {}
        state = _adapter_state(adapter_dir)
        for key, tensor in state.items():
            module, kind = _module_key(key)
            if key.endswith(".original_module.weight"):
                continue
            if kind in ("lora_A", "lora_B"):
                self.lora.setdefault(f"{module}.weight", {})[kind] = tensor
            elif kind == "full":
                self.full[f"{module}.weight"] = tensor
            else:
                raise UserError(f"adapter tensor {key} is neither LoRA A/B nor a module to save", where=str(adapter_dir))
        self.config = dict(base.config)
        for name, pair in self.lora.items():
            if name not in base.entries or set(pair) != {"lora_A", "lora_B"}:
                raise UserError(f"the adapter was made for another base model: no base tensor {name} "
                                "(or a LoRA pair is incomplete)", where=str(adapter_dir))
            out_features, in_features = base.entries[name].shape
            if pair["lora_A"].shape[1] != in_features or pair["lora_B"].shape[0] != out_features:
                raise UserError(f"the adapter was made for another base model: {name} is {[out_features, in_features]}, "
                                f"LoRA B @ A is {[pair['lora_B'].shape[0], pair['lora_A'].shape[1]]}", where=str(adapter_dir))
        for name, tensor in self.full.items():
            if name not in ("model.embed_tokens.weight", "lm_head.weight") or tensor.shape[1] != base.config["hidden_size"]:
                raise UserError(f"the adapter's saved module {name} {list(tensor.shape)} does not fit the base",
                                where=str(adapter_dir))
            self.config["vocab_size"] = int(tensor.shape[0])
        self.entries = dict(base.entries)
        for name, tensor in self.full.items():
            self.entries[name] = TensorEntry(adapter_dir, str(tensor.dtype), tuple(tensor.shape))
        rows = {self.shape(n)[0] for n in ("model.embed_tokens.weight", "lm_head.weight")}
        if len(rows) != 1:
            raise UserError(f"embed_tokens and lm_head disagree on the vocabulary after the adapter ({sorted(rows)})",
                            where=str(adapter_dir))

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.full:
            return tuple(self.full[name].shape)
        return self.base.shape(name)

    def tensor(self, name: str, rows: slice | None = None) -> torch.Tensor:
        every = slice(None)
        if name in self.full:
            return self.full[name][rows or every].to(torch.float32, copy=True)
        weight = self.base.tensor(name, rows)
        pair = self.lora.get(name)
        if pair is not None:
            # PEFT's get_delta_weight then `base.weight.data += delta` (fp32 here, as the fp32 export merges); the
            # rows of B @ A are the rows of B times A
            delta = (pair["lora_B"][rows or every].to(torch.float32) @ pair["lora_A"].to(torch.float32)) * self.scaling
            weight += delta
        return weight

    def rows(self, name: str, indices: list[int]) -> torch.Tensor:
        if name in self.full:
            return self.full[name][indices].to(torch.float32, copy=True)
        picked = self.base.rows(name, indices)
        pair = self.lora.get(name)
        if pair is not None:
            picked += (pair["lora_B"][indices].to(torch.float32) @ pair["lora_A"].to(torch.float32)) * self.scaling
        return picked

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        if name in self.full:
            return out.copy_(self.full[name])
        self.base.read_into(name, out)
        pair = self.lora.get(name)
        if pair is not None:
            out += (pair["lora_B"].to(torch.float32) @ pair["lora_A"].to(torch.float32)) * self.scaling
        return out

    @property
    def weight_bytes(self) -> int:
        return sum(e.nbytes_fp32 for e in self.entries.values())
