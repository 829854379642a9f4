"""genai_config.json for a compiled folder, so onnxruntime-genai (og.Model / og.Generator) can run it.

The layout follows what onnxruntime-genai's own model builder writes (`models/builders/base.py`,
`make_genai_config`): a `model` block (special tokens, context length, decoder file, head layout and
I/O names with `%d` standing for the layer index) and a `search` block (generation defaults).

llmship's decoder keeps optimum's I/O names. With the default (MultiHeadAttention) fusion the KV cache grows by
concatenation, so `past_present_share_buffer` is false: onnxruntime-genai then feeds `past_key_values.N.*` of the
current length and reads back `present.N.*`, as llmship's OrtEngine does. A GroupQueryAttention graph updates a
max-length cache in place, and gets `past_present_share_buffer: true`.

Every compiled folder (fp32 and each variant) gets its genai_config.json written by `write_folder_genai_config`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llmship.errors import UserError
from llmship.files import GENAI_CONFIG_FILE, MODEL_FILE, write_json_atomic
from llmship.runtime.providers import genai_provider_options

# onnxruntime-genai's builder defaults for the `search` block (HF GenerationConfig defaults).
SEARCH_DEFAULTS: dict[str, Any] = {
    "diversity_penalty": 0.0,
    "do_sample": False,
    "early_stopping": True,
    "length_penalty": 1.0,
    "min_length": 0,
    "no_repeat_ngram_size": 0,
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
}

_PAST_KEY = re.compile(r"^past_key_values\.(\d+)\.key$")
_PRESENT_KEY = re.compile(r"^present\.(\d+)\.key$")


def _as_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, Mapping):
        return dict(cfg)
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return dict(vars(cfg))


def _onnx_names(model_path: Path) -> tuple[list[str], list[str]]:
    """Graph input / output names, read without loading the weights."""
    import onnx

    if not model_path.is_file():
        raise UserError("decoder file not found", where=str(model_path))
    proto = onnx.load(str(model_path), load_external_data=False)
    return [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]


def genai_io_block(inputs: list[str], outputs: list[str], where: str) -> tuple[dict[str, str], dict[str, str]]:
    """The decoder's `inputs` / `outputs` blocks of genai_config from the graph's names (optimum convention)."""
    if "input_ids" not in inputs or "logits" not in outputs:
        raise UserError("decoder must take 'input_ids' and produce 'logits' (optimum names)", where=where)
    block_in: dict[str, str] = {"input_ids": "input_ids"}
    for name in ("attention_mask", "position_ids"):
        if name in inputs:
            block_in[name] = name
    if any(_PAST_KEY.match(n) for n in inputs):
        block_in["past_key_names"] = "past_key_values.%d.key"
        block_in["past_value_names"] = "past_key_values.%d.value"
    block_out: dict[str, str] = {"logits": "logits"}
    if any(_PRESENT_KEY.match(n) for n in outputs):
        block_out["present_key_names"] = "present.%d.key"
        block_out["present_value_names"] = "present.%d.value"
    return block_in, block_out


def build_genai_config(hf_config: Any, generation_config: Any, onnx_io: Mapping[str, Any]) -> dict[str, Any]:
    """The genai_config dict. `onnx_io`: filename, inputs, outputs (graph names), optional
    context_length, past_present_share_buffer, session_options, provider ("cpu" | "cuda")."""
    hf = _as_dict(hf_config)
    gen = _as_dict(generation_config)
    where = "config.json"
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise UserError(f"missing integer field '{key}' needed by genai_config", where=where)
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    head_size = hf.get("head_dim") or hf["hidden_size"] // heads
    context_length = int(onnx_io.get("context_length") or hf.get("max_position_embeddings") or 2048)
    filename = str(onnx_io.get("filename", MODEL_FILE))
    provider = str(onnx_io.get("provider", "cpu"))
    inputs, outputs = genai_io_block(list(onnx_io["inputs"]), list(onnx_io["outputs"]), where=filename)

    def special(name: str) -> Any:  # generation_config.json wins over config.json, as in the builder
        return gen[name] if gen.get(name) is not None else hf.get(name)

    eos = special("eos_token_id")
    pad = special("pad_token_id")
    if pad is None:  # onnxruntime-genai needs a pad id for batches; LLaMA has none, the builder uses eos
        pad = eos[0] if isinstance(eos, list) else eos
    model_type = str(hf.get("model_type") or "llama")

    search = dict(SEARCH_DEFAULTS)
    for key in SEARCH_DEFAULTS:
        if gen.get(key) is not None and key != "early_stopping":
            search[key] = gen[key]
    search["max_length"] = context_length
    search["past_present_share_buffer"] = bool(onnx_io.get("past_present_share_buffer", False))

    return {
        "model": {
            "bos_token_id": special("bos_token_id"),
            "context_length": context_length,
            "decoder": {
                "session_options": {
                    "log_id": "onnxruntime-genai",
                    # CPU needs no entry; other execution providers are named here, as the builder does
                    "provider_options": genai_provider_options(provider),
                    **dict(onnx_io.get("session_options", {})),
                },
                "filename": filename,
                "head_size": head_size,
                "hidden_size": hf["hidden_size"],
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": heads,
                "num_hidden_layers": hf["num_hidden_layers"],
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": model_type,
            "vocab_size": hf["vocab_size"],
        },
        "search": search,
    }


def write_genai_config(folder: Path, hf_config: Any, generation_config: Any = None, onnx_io: Mapping[str, Any] | None = None) -> Path:
    """Write `folder/genai_config.json` (atomically) and return its path.

    `hf_config` / `generation_config`: transformers config objects or plain dicts (generation config may be None).
    `onnx_io`: {"filename": "model.onnx", "inputs": [...], "outputs": [...], ...}; names missing from it are
    read from the decoder file in `folder`; past_present_share_buffer defaults to true for a
    GroupQueryAttention graph (in-place cache) and false otherwise.
    """
    folder = Path(folder)
    io = dict(onnx_io or {})
    io.setdefault("filename", MODEL_FILE)
    if "inputs" not in io or "outputs" not in io:
        names_in, names_out = _onnx_names(folder / io["filename"])
        io.setdefault("inputs", names_in)
        io.setdefault("outputs", names_out)
    if "past_present_share_buffer" not in io:
        # GroupQueryAttention updates a max-length cache in place (faster); concat-style attention cannot
        from llmship.runtime.layout import runtime_padding

        io["past_present_share_buffer"] = runtime_padding(folder / io["filename"]) == "right"
    config = build_genai_config(hf_config, generation_config, io)
    target = folder / GENAI_CONFIG_FILE
    return write_json_atomic(target, config, indent=4)


def write_folder_genai_config(folder: Path, provider: str = "cpu") -> Path:
    """genai_config.json for a compiled folder from its own config.json, generation_config.json and graph, so the
    folder also runs in onnxruntime-genai (`og.Model(folder)`) as it stands."""
    folder = Path(folder)

    def read(name: str) -> dict[str, Any]:
        file = folder / name
        try:
            return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
        except (OSError, ValueError) as exc:
            raise UserError(f"unreadable: {exc}", where=str(file)) from None

    return write_genai_config(folder, read("config.json"), read("generation_config.json"), {"provider": provider})
