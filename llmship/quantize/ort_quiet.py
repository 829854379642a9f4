"""ONNX Runtime's quantizers (`quantize_static`, `quantize_dynamic`) log a hint through the root logger, twice per call,
to run their pre-processing first, with a link to an image-classification example. It does not apply to llmship's
graphs: that pre-processing is shape inference plus ORT graph optimization, and llmship's export already infers shapes
and fuses the graph itself (llmship.export.fusion), while the quantizers here only rewrite MatMuls with constant
weights. `without_preprocess_hint()` drops that one message around those calls; every other record passes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

# The start of both messages in onnxruntime/quantization/quantize.py (1.16 to 1.23 at least).
PREPROCESS_HINT = "Please consider"


class _DropPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith(PREPROCESS_HINT) and "pre-process" in message)


@contextlib.contextmanager
def without_preprocess_hint() -> Iterator[None]:
    """Drop ONNX Runtime's quantization pre-processing hint while the block runs (the root logger only: the quantizer
    calls `logging.warning` directly; a logger's filter sees exactly the records logged through it)."""
    root = logging.getLogger()
    hint = _DropPreprocessHint()
    root.addFilter(hint)
    try:
        yield
    finally:
        root.removeFilter(hint)
