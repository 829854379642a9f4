"""Scheme registry: scheme name -> a small class with typed options, its methods, default parity tolerances,
whether it reads calibration data, and one `quantize` method. Adding a scheme means adding a module that calls
`register` and importing it in `llmship/quantize/__init__.py`; `SCHEMES` is the only list of schemes (the config
validates `quantize.scheme` against it).

`resolve_variant` turns a variant's config section into a `Variant` (the section and its scheme object, method and
options resolved) once; every later step (stage key, calibration, build, parity) reads that object.

Imports nothing from llmship but `errors` and `sections`: llmship.config imports the registry to validate schemes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from llmship.errors import UserError
from llmship.sections import ParityConfig

if TYPE_CHECKING:  # annotations only: llmship.config imports this module
    from llmship.config import QuantizeConfig, VariantConfig
from llmship.quantize.auto import check_auto

# Tie-aware greedy bar of the integer schemes: the run must match, near-ties forgiven, for at least half its tokens.
# Their tie tolerance is 4 sigma of their measured logit noise, so over 4 prompts x 32 steps a correct variant may still
# meet one flip beyond it late in a run; a broken one diverges within the first tokens (tests/export/test_parity_ties.py).
QUANTIZED_GREEDY_MATCH = 0.5
# Folder of the fp32 export under output.dir: the variant of the scheme that builds the export (`scheme: none`).
EXPORT_FOLDER = "fp32"

log = logging.getLogger("llmship")


class SchemeOptions(BaseModel):
    """Options block of a scheme (`quantize.options` in YAML); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class QuantizeJob:
    """Everything a scheme needs besides its options: the fp32 folder, the calibration set, exclusions."""

    source: Path                        # fp32 model.onnx
    folder: Path                        # fp32 artifact folder (config.json etc.)
    target: Path                        # folder the scheme writes model.onnx into (a temp sibling of the variant)
    samples: list[list[int]] | None     # calibration token lists, None when no calibration set was built
    exclude: list[str]
    external_data: str = "auto"
    progress: Callable[[str], None] = field(default=lambda message: None)
    provider: str = "cpu"               # runtime.provider: GPTQ's arithmetic runs on CUDA when it is cuda


class Scheme:
    """Base class: subclasses set `name`, `Options`, `methods` (first = default), `parity`, `needs_calibration`."""

    name: ClassVar[str]
    Options: ClassVar[type[SchemeOptions]] = SchemeOptions
    methods: ClassVar[tuple[str, ...]] = ()
    parity: ClassVar[ParityConfig] = ParityConfig()
    needs_calibration: ClassVar[bool | tuple[str, ...]] = False  # True, or the methods that need it
    builds_export: ClassVar[bool] = False  # True for fp32: its variant is the export itself, nothing rewrites it
    # Output bytes per checkpoint parameter when the streaming compile (llmship.export.streaming) writes the scheme
    # tensor by tensor, with headroom for scales and the graph (its disk check adds these up); None: the scheme needs
    # the whole model.
    stream_bytes_per_param: ClassVar[float | None] = None
    auto: Any = None  # the variant's `quantize.auto` (llmship.quantize.auto), which reads the calibration set
    # What a layer-wise calibration feeds the next layer (`quantize_layer`): the float or the quantized layer's outputs.
    layer_feeds_forward: ClassVar[str] = "float"

    @classmethod
    def variant_name(cls, method: str | None) -> str:
        """The variant's folder name when the YAML gives it no `name`: the scheme, plus the method written there."""
        return f"{cls.name}-{method}" if method else cls.name

    def __init__(self, method: str | None, options: SchemeOptions):
        self.method = method
        self.options = options

    def uses_calibration(self) -> bool:
        """Whether `quantize` reads `job.samples` with these options (the compile stage builds the calibration set,
        and reads its data files, only when some variant's scheme says so)."""
        if self.auto is not None:
            return True
        if isinstance(self.needs_calibration, tuple):
            return self.method in self.needs_calibration
        return bool(self.needs_calibration)

    def streams(self) -> bool:
        """Whether the streaming compile can build it: a per-tensor rewrite that reads no calibration data, or a
        calibrated rewrite that runs one decoder layer at a time (`calibrates_by_layer`); awq, fp16's overflow scan
        and `quantize.auto` still run the whole model."""
        return self.stream_bytes_per_param is not None and (not self.uses_calibration() or self.calibrates_by_layer())

    def calibrates_by_layer(self) -> bool:
        """Whether, with these options, it can calibrate one decoder layer at a time (`quantize_layer`,
        llmship.quantize.layerwise)."""
        return False

    def packs_calibration(self) -> bool:
        """Whether its calibration packs the samples into rows of the longest one's length (feeds.packed_feeds), so
        that a set with no sample of calibration.seq_len tokens would calibrate it on short contexts only."""
        return True

    def layer_feeds(self, samples: list[list[int]], spec: Any) -> list[dict[str, Any]]:
        """The calibration batches of a layer-wise run: the graph inputs of each (llmship.quantize.feeds)."""
        from llmship.quantize.feeds import CALIBRATION_BATCH, packed_feeds

        return packed_feeds(samples, spec, batch=CALIBRATION_BATCH)

    def quantize_layer(self, job: Any) -> tuple[Any, dict[str, Any]]:
        """Calibrate and rewrite one segment (`job`: a llmship.quantize.layerwise.LayerJob), calling `job.carry` with
        the graph whose outputs feed the next segment; returns (rewritten graph, this segment's report)."""
        raise NotImplementedError(f"{self.name} does not calibrate one layer at a time")

    def finish_layers(self, reports: list[dict[str, Any]], samples: list[list[int]]) -> dict[str, Any]:
        """The variant's report from its segments' (`quantize_layer`) reports."""
        raise NotImplementedError(f"{self.name} does not calibrate one layer at a time")

    def columnwise(self) -> bool:
        """Whether the rewrite of a weight's output columns (an embedding table's rows) taken apart, concatenated,
        is the rewrite of the whole weight: the streaming compile then quantizes large weights in chunks. True for
        blocks along K and one scale per output channel; a scale per tensor, or a search over the whole tensor, is not
        (the streaming compile also checks what it can: chunks must agree on every tensor that does not grow with them)."""
        return True

    def quantize(self, job: QuantizeJob) -> dict[str, Any]:
        """Write `job.target/model.onnx`; return the report (quantized nodes, kept nodes, counts)."""
        raise NotImplementedError

    def check(self, where: str) -> None:
        """Cross-field checks of the options (UserError naming `where.options.<field>`): every block size is a power
        of two >= 16 (MatMulNBits, GatherBlockQuantized); subclasses add their own and call this."""
        for name, value in self.options.model_dump().items():
            if name.endswith(("block_size", "embedding_block", "group_size")) and value is not None and (value < 16 or value & (value - 1)):
                raise UserError(f"{name} must be a power of two >= 16 (got {value})", where=f"{where}.options.{name}")

    def describe(self) -> dict[str, Any]:
        return {"scheme": self.name, "method": self.method, "options": self.options.model_dump()}


SCHEMES: dict[str, type[Scheme]] = {}


def register(cls: type[Scheme]) -> type[Scheme]:
    SCHEMES[cls.name] = cls
    return cls


def build_scheme(variant: VariantConfig, where: str = "quantize") -> Scheme:
    """The scheme object of a variant; UserError names the field of an unknown method or option."""
    cls = SCHEMES.get(variant.scheme)
    if cls is None:
        raise UserError(f"scheme '{variant.scheme}' has no quantizer; known: {', '.join(sorted(SCHEMES))}", where=f"{where}.scheme")
    method = variant.method
    if cls.methods:
        method = method or cls.methods[0]
        if method not in cls.methods:
            raise UserError(f"unknown method '{method}' for scheme {cls.name}; choose one of: {', '.join(cls.methods)}",
                            where=f"{where}.method")
    elif method is not None:
        raise UserError(f"scheme {cls.name} has no methods (got '{method}'); remove `method`", where=f"{where}.method")
    try:
        options = cls.Options.model_validate(variant.options)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        known = ", ".join(cls.Options.model_fields)
        if err["type"] == "extra_forbidden":
            raise UserError(f"unknown option '{key}' for scheme {cls.name}; known options: {known}",
                            where=f"{where}.options.{key}") from None
        raise UserError(f"option '{key}' of scheme {cls.name}: {err['msg']} (got {err.get('input')!r})",
                        where=f"{where}.options.{key}") from None
    scheme = cls(method, options)
    scheme.check(where)
    if variant.auto is not None:
        scheme.auto = variant.auto
        check_auto(scheme, variant.auto, where)
    return scheme


@dataclass(frozen=True)
class Variant:
    """A variant resolved once: its config section and its scheme object (method and options with defaults filled
    in), and where the YAML writes it (`quantize`, `quantize.variants.N`)."""

    config: VariantConfig
    scheme: Scheme
    where: str = "quantize"

    @property
    def name(self) -> str:
        return self.config.variant_name

    @property
    def folder_name(self) -> str:
        """Its folder under output.dir: the export's for the fp32 variant, whatever its name."""
        return EXPORT_FOLDER if self.scheme.builds_export else self.name

    @property
    def reads_calibration(self) -> bool:
        """Whether building it reads the calibration set (the compile reads the data files only then)."""
        return self.scheme.uses_calibration()

    @property
    def parity(self) -> ParityConfig:
        """Its parity tolerances: its own `parity` block, else its scheme's defaults."""
        return self.config.parity if self.config.parity is not None else self.scheme.parity

    def describe(self) -> dict[str, Any]:
        """What a build of it reads of the config: the section as written and the scheme as resolved (so a default
        that changes between releases rebuilds the variant instead of reusing one built with the old default)."""
        return {"variant": self.config.model_dump(), "scheme": self.scheme.describe()}


def resolve_variant(config: VariantConfig, where: str = "quantize") -> Variant:
    """The variant with its scheme built; UserError naming the field of an unknown method or option."""
    return Variant(config, build_scheme(config, where), where)


def resolve_variants(quantize: QuantizeConfig) -> list[Variant]:
    """Every variant the `quantize` section lists, each resolved once."""
    return [resolve_variant(variant, "quantize" if i == 0 else f"quantize.variants.{i - 1}")
            for i, variant in enumerate(quantize.all_variants())]

