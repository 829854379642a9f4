"""The source model: a LLaMA-family Hugging Face checkpoint (local folder or hub id), optionally with a
LoRA adapter merged in, plus its tokenizer. Every way a folder can be wrong ends in one `UserError` line.

Only `LlamaForCausalLM` is supported: the ONNX graph, the runtime and the quantizers assume its layout
(RMSNorm, rotary attention with optional GQA, SwiGLU MLP).
"""

from __future__ import annotations

import json
import logging
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from llmship.config import EMBEDDED, EMBEDDED_MODEL_DIR, ModelConfig
from llmship.errors import UserError

log = logging.getLogger("llmship")

SUPPORTED = "llmship supports LLaMA-family models (LlamaForCausalLM, model_type 'llama')"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_DEPRECATION = r"`is_gradient_checkpointing` is deprecated"  # transformers >= 5.2x, raised through peft
# Files that make up a tokenizer folder; copied beside the exported graph.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


@dataclass
class SourceModel:
    """The loaded source: HF model (eval mode, its dtype), tokenizer and where they came from."""

    model: Any
    tokenizer: Any
    path: str
    adapter: str | None
    fingerprint: dict[str, str | None]
    dtype: str
    tokenizer_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def config(self) -> Any:
        return self.model.config


# --------------------------------------------------------------------------- tokenizer
class LlamaSentencePieceTokenizer(SentencePieceBackend):
    """LLaMA's tokenizer run by SentencePiece itself (what transformers 4's slow LlamaTokenizer, legacy mode, did and
    what GPTQ/OpenCompass tokenize with). transformers 5's LlamaTokenizer converts tokenizer.model to a `tokenizers`
    BPE that segments whitespace runs differently (e.g. code indentation: 6% of alpaca-cleaned records differ)."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | None = None, unk_token: str = "<unk>", bos_token: str = "<s>", eos_token: str = "</s>",
                 pad_token: str | None = None, add_bos_token: bool = True, add_eos_token: bool = False, **kwargs: Any):
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        kwargs.setdefault("legacy", True)
        super().__init__(vocab_file=vocab_file, unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
                         pad_token=pad_token, **kwargs)

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + token_ids_0 + eos
        return ids if token_ids_1 is None else ids + bos + token_ids_1 + eos


def load_tokenizer(path: str | Path, revision: str | None = None) -> Any:
    """Tokenizer of a model folder, an exported llmship folder or a hub id, left padding and truncation.

    A folder with tokenizer.json uses it (AutoTokenizer); a folder with only tokenizer.model (LLaMA 1/2,
    Chinese-LLaMA) is run by SentencePiece itself, with BOS on every text as LLaMA expects.
    """
    from transformers import AutoTokenizer

    folder = Path(path)
    try:
        if folder.is_dir():
            if (folder / "tokenizer.json").is_file():
                tok = AutoTokenizer.from_pretrained(str(folder))
            elif (folder / "tokenizer.model").is_file():
                tok = LlamaSentencePieceTokenizer.from_pretrained(str(folder))
            else:
                raise UserError("no tokenizer files (tokenizer.model or tokenizer.json) in the folder", where=str(folder))
        else:
            tok = AutoTokenizer.from_pretrained(str(path), revision=revision)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad tokenizer file
        raise UserError(f"cannot load the tokenizer: {_one_line(exc)}", where=str(path)) from None
    _prefix_like_sentencepiece(tok)
    tok.padding_side = "left"
    tok.truncation_side = "left"
    return tok


def _prefix_like_sentencepiece(tok: Any) -> None:
    """Give a LLaMA `tokenizers` backend SentencePiece's dummy prefix on text that starts with a space.

    transformers 5's LlamaTokenizer replaces tokenizer.json's pre-tokenizer with `Metaspace`, which prepends "▁" only
    when the text does not start with one, so " x" becomes "▁x" where SentencePiece (and the model's training) saw
    "▁▁x". The normalizer that transformers 4 wrote for LLaMA (Prepend "▁", then spaces to "▁") is exact on plain
    text; it also prefixes text that follows a special token written inside the text, as legacy mode did.
    """
    from tokenizers import AddedToken, normalizers, pre_tokenizers

    backend = getattr(tok, "_tokenizer", None)
    metaspace = getattr(backend, "pre_tokenizer", None)
    if (not isinstance(metaspace, pre_tokenizers.Metaspace) or metaspace.split or backend.normalizer is not None
            or metaspace.prepend_scheme not in ("always", "first")):
        return
    # An added token marked `normalized` is matched on normalized text, which would now carry the prefix: with no
    # normalizer before, matching it raw is the same rule.
    backend.add_tokens([AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip, normalized=False,
                                   special=t.special) for t in backend.get_added_tokens_decoder().values() if t.normalized])
    marker = metaspace.replacement
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(marker), normalizers.Replace(" ", marker)])
    backend.pre_tokenizer = None


# --------------------------------------------------------------------------- model
def resolve_model_path(path: str) -> str:
    return str(EMBEDDED_MODEL_DIR) if path == EMBEDDED else path


def _looks_local(path: str) -> bool:
    # A hub id is 'name' or 'org/name'; anything else (absolute, ./, ~, deeper) is meant as a folder.
    return Path(path).expanduser().exists() or path.startswith((".", "/", "~")) or path.count("/") > 1


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _read_config(folder: Path, where: str) -> dict:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError("no config.json in the model folder (is this a Hugging Face checkpoint?)", where=where)
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"config.json is not valid JSON: {_one_line(exc)}", where=str(config_file)) from None


def check_architecture(config: dict, where: str, trust_remote_code: bool = False) -> None:
    """LLaMA only: model_type 'llama' and LlamaForCausalLM; custom code only when explicitly trusted."""
    arch = config.get("architectures") or []
    model_type = config.get("model_type")
    if "auto_map" in config and not trust_remote_code:
        raise UserError(f"the model needs custom code (auto_map, trust_remote_code); {SUPPORTED}", where=where)
    if model_type != "llama" or (arch and "LlamaForCausalLM" not in arch):
        got = ", ".join(arch) if arch else f"model_type {model_type!r}"
        raise UserError(f"unsupported architecture {got}; {SUPPORTED}", where=where)


def _safetensors_ok(file: Path) -> str | None:
    """Why a .safetensors file is unreadable or truncated (None when its header and size agree)."""
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return "file is empty or truncated"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 << 20:
                return "header is corrupt or the file is truncated"
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"header is corrupt ({_one_line(exc)})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"file is truncated ({size} of {expected} bytes)"
    return None


def check_weights(folder: Path) -> None:
    """Weights present and, for safetensors, complete (a truncated download fails here, not mid-load)."""
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise UserError(f"no weights in the model folder (expected one of {', '.join(WEIGHT_FILES)})", where=str(folder))
    files: list[Path] = []
    for name in present:
        if name.endswith(".index.json"):
            try:
                index = json.loads((folder / name).read_text(encoding="utf-8"))
                shards = sorted(set(index["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UserError(f"weight index is unreadable: {_one_line(exc)}", where=str(folder / name)) from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise UserError(f"weight shard(s) missing: {', '.join(missing[:3])}", where=str(folder)) from None
            files += [folder / s for s in shards]
        else:
            files.append(folder / name)
    for file in files:
        if file.suffix == ".safetensors" and (why := _safetensors_ok(file)):
            raise UserError(f"weights unreadable: {why}", where=str(file))


def _load_weights_model(path: str, cfg: ModelConfig, where: str) -> Any:
    from transformers import LlamaForCausalLM

    kwargs: dict[str, Any] = {"dtype": TORCH_DTYPES[cfg.dtype], "output_loading_info": True}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        model, info = LlamaForCausalLM.from_pretrained(path, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt files surface as many exception types
        raise UserError(f"cannot load the model weights: {_one_line(exc)}", where=where) from None
    missing = [k for k in info.get("missing_keys", []) if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        what = f"{len(missing)} weight(s) missing, e.g. {sorted(missing)[0]}" if missing else f"shape mismatch: {mismatched[0]}"
        raise UserError(f"the weights do not match config.json: {what}", where=where)
    return model.eval()


def _adapter_state(folder: Path) -> dict[str, torch.Tensor]:
    for name in ADAPTER_WEIGHTS:
        file = folder / name
        if not file.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                if why := _safetensors_ok(file):
                    raise UserError(f"adapter weights unreadable: {why}", where=str(file))
                from safetensors.torch import load_file

                return load_file(str(file))
            return torch.load(file, map_location="cpu", weights_only=True)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"adapter weights unreadable: {_one_line(exc)}", where=str(file)) from None
    raise UserError(f"no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})", where=str(folder))


def _module_key(key: str) -> tuple[str, str]:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' -> ('model.layers.0.self_attn.q_proj', 'lora_A')."""
    name = key.removeprefix("base_model.model.")
    for part in (".lora_A.", ".lora_B."):
        if part in name:
            return name.split(part)[0], part.strip(".")
    # modules_to_save: old PEFT (Chinese-LLaMA-Alpaca) saves '<module>.weight', newer PEFT adds
    # '.modules_to_save[.default].weight' and '.original_module.weight'.
    for suffix in (".modules_to_save.default.weight", ".modules_to_save.weight", ".original_module.weight", ".weight"):
        if name.endswith(suffix):
            return name[: -len(suffix)], "full"
    return name, "other"


def check_adapter_fits(model: Any, state: dict[str, torch.Tensor], where: str) -> int | None:
    """Every adapter tensor names a module of the base with matching shape; returns the vocab rows the
    adapter's embed_tokens/lm_head carry (resized vocabularies, as Chinese-LLaMA-Alpaca ships)."""
    modules = dict(model.named_modules())
    hidden = model.config.hidden_size
    vocab_rows = None
    for key, tensor in state.items():
        name, kind = _module_key(key)
        module = modules.get(name)
        if module is None:
            raise UserError(f"the adapter was made for another base model: it has '{name}', the base has no such module", where=where)
        if kind == "lora_A" and tensor.shape[1] != module.weight.shape[1]:
            raise UserError(f"the adapter was made for another base model: {name} input size {tensor.shape[1]} vs "
                            f"{module.weight.shape[1]}", where=where)
        if kind == "lora_B" and tensor.shape[0] != module.weight.shape[0]:
            raise UserError(f"the adapter was made for another base model: {name} output size {tensor.shape[0]} vs "
                            f"{module.weight.shape[0]}", where=where)
        if kind == "full" and name.endswith(("embed_tokens", "lm_head")):
            if tensor.shape[1] != hidden:
                raise UserError(f"the adapter was made for another base model: {name} width {tensor.shape[1]} vs {hidden}",
                                where=where)
            vocab_rows = tensor.shape[0]
    return vocab_rows


def merge_adapter(model: Any, adapter_dir: Path) -> Any:
    """PEFT LoRA merged into the base weights (merge_and_unload), after growing the vocab to the adapter's."""
    from peft import PeftModel

    where = str(adapter_dir)
    cfg_file = adapter_dir / "adapter_config.json"
    if not cfg_file.is_file():
        raise UserError("no adapter_config.json in the adapter folder (expected a PEFT LoRA adapter)", where=where)
    try:
        adapter_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"adapter_config.json is not valid JSON: {_one_line(exc)}", where=str(cfg_file)) from None
    if str(adapter_cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise UserError(f"only LoRA adapters are supported, this one is {adapter_cfg.get('peft_type')}", where=str(cfg_file))
    state = _adapter_state(adapter_dir)
    rows = check_adapter_fits(model, state, where)
    if rows and rows != model.get_input_embeddings().weight.shape[0]:
        # Chinese-LLaMA-Alpaca's merge script: resize the base to the adapter's vocabulary first (the adapter's
        # embed_tokens/lm_head then replace every row, so the new rows need no careful init).
        model.resize_token_embeddings(rows, mean_resizing=False)
    try:
        with warnings.catch_warnings():
            # peft (0.21) reads transformers' deprecated `is_gradient_checkpointing` while wrapping the model: a
            # FutureWarning about the two libraries, not about this adapter or anything the user can change.
            warnings.filterwarnings("ignore", message=PEFT_DEPRECATION, category=FutureWarning)
            peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        merged = peft_model.merge_and_unload()
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot merge the adapter into the base model: {_one_line(exc)}", where=where) from None
    return merged.eval()


def _tokenizer_source(model_dir: Path | None, adapter_dir: Path | None) -> Path | None:
    # An adapter that extends the vocabulary ships its own tokenizer (Chinese-LLaMA-Alpaca does).
    for folder in (adapter_dir, model_dir):
        if folder is not None and any((folder / f).is_file() for f in ("tokenizer.model", "tokenizer.json")):
            return folder
    return None


def load_source(model_cfg: ModelConfig) -> SourceModel:
    """Load and check the source model (+ adapter), in its configured dtype, eval mode."""
    from llmship.cache import folder_fingerprint

    path = resolve_model_path(model_cfg.path)
    local = _looks_local(path)
    model_dir = Path(path).expanduser() if local else None
    if model_dir is not None:
        if not model_dir.is_dir():
            raise UserError("model folder not found", where=f"model.path ({path})")
        config = _read_config(model_dir, str(model_dir))
        check_architecture(config, str(model_dir / "config.json"), model_cfg.trust_remote_code)
        check_weights(model_dir)
    else:
        _check_hub_config(path, model_cfg)
    adapter_dir = None
    if model_cfg.adapter:
        adapter_dir = Path(model_cfg.adapter).expanduser()
        if not adapter_dir.is_dir():
            raise UserError("adapter folder not found", where=f"model.adapter ({model_cfg.adapter})")

    tok_dir = _tokenizer_source(model_dir, adapter_dir)
    if tok_dir is None and model_dir is not None:
        raise UserError("no tokenizer files (tokenizer.model or tokenizer.json) in the model or adapter folder", where=str(model_dir))
    tokenizer = load_tokenizer(tok_dir) if tok_dir is not None else load_tokenizer(path, model_cfg.revision)

    model = _load_weights_model(str(model_dir) if model_dir else path, model_cfg, where=str(model_dir or path))
    notes: list[str] = []
    if adapter_dir is not None:
        model = merge_adapter(model, adapter_dir)
        notes.append(f"merged LoRA adapter {adapter_dir}")
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) != rows:
        if not model_cfg.resize_embeddings:
            raise UserError(
                f"tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows; use the matching tokenizer "
                "or set model.resize_embeddings=true", where=str(tok_dir or path))
        model.resize_token_embeddings(len(tokenizer))
        notes.append(f"resized embeddings {rows} -> {len(tokenizer)}")
    model.config.vocab_size = model.get_input_embeddings().weight.shape[0]
    fingerprint = {
        "model": folder_fingerprint(model_dir) if model_dir else f"hub:{path}@{model_cfg.revision or 'main'}",
        "adapter": folder_fingerprint(adapter_dir) if adapter_dir else None,
    }
    return SourceModel(model=model.eval(), tokenizer=tokenizer, path=str(model_dir or path),
                       adapter=str(adapter_dir) if adapter_dir else None, fingerprint=fingerprint, dtype=model_cfg.dtype,
                       tokenizer_dir=str(tok_dir) if tok_dir else None, notes=notes)


def _check_hub_config(hub_id: str, model_cfg: ModelConfig) -> None:
    from transformers import AutoConfig

    from llmship.data.sources import hub_logs_once

    hub_logs_once()
    try:
        config = AutoConfig.from_pretrained(hub_id, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated repo...
        raise UserError(f"not a local folder and not loadable from the hub: {_one_line(exc)}", where=f"model.path ({hub_id})") from None
    check_architecture(config.to_dict(), f"model.path ({hub_id})", model_cfg.trust_remote_code)
