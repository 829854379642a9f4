"""One YAML file -> one typed config tree for the whole chain.

Every field has a default and a one-line description (printed by `llmship config schema`).
Unknown keys and wrong types are `UserError`s naming the file, the field path and the YAML line.
Dotted overrides (`model.path=./m`) are applied after the file is read, before validation.
"""

from __future__ import annotations

import difflib
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator

from llmship.errors import UserError
from llmship.sections import AutoConfig, ParityConfig, Section

# Paths that point into llmship's own bundled assets (no network needed).
EMBEDDED = "@embedded"
ASSETS_DIR = Path(__file__).parent / "assets"
EMBEDDED_MODEL_DIR = ASSETS_DIR / "tiny-llama-zh"
SAMPLES_DIR = ASSETS_DIR / "samples"


# --------------------------------------------------------------------------- model
class ModelConfig(Section):
    path: str = Field(EMBEDDED, description="Local Hugging Face folder, hub id, or '@embedded' for the bundled tiny model.")
    adapter: str | None = Field(None, description="Optional LoRA adapter folder (PEFT format) merged into the base before export.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Dtype the PyTorch baseline runs in and the export starts from."
    )
    # How the baseline runs, not what the model is: left out of model_dump (exclude), so the model's part of every
    # stage key (compiled variants, eval, bench) is what it was before this field existed.
    baseline: Literal["auto", "whole", "layerwise"] = Field(
        "auto", exclude=True, description="PyTorch baseline: 'whole' model in `dtype`, 'layerwise' (one decoder layer "
        "at a time, fp32, eval only, slow), or 'auto' (whole when its memory estimate fits in available RAM)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) when `path` is a hub id.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model folder (off: only built-in LLaMA).")
    resize_embeddings: bool = Field(
        False, description="When the tokenizer and embedding sizes differ, resize the embeddings instead of failing."
    )


# --------------------------------------------------------------------------- export
class ExportConfig(Section):
    opset: int = Field(18, ge=14, description="ONNX opset of the exported decoder.")
    external_data: Literal["auto", "always", "never"] = Field(
        "auto", description="Store weights in model.onnx.data: 'auto' does so when the model is over 2 GB."
    )
    optimize: bool = Field(True, description="Fuse the graph for ONNX Runtime (onnxscript's ORT fusions) when it passes parity.")
    attention: Literal["mha", "gqa"] = Field(
        "mha", description="Fused attention op: mha (MultiHeadAttention) or gqa (GroupQueryAttention, right-padded prompts)."
    )
    slim: bool = Field(False, description="Run onnxslim graph clean-up after export.")
    streaming: bool = Field(False, description="Build every variant straight from the checkpoint, one tensor at a time "
                            "(memory independent of depth; schemes none, w8a16, w4a16 rtn/hqq, w8a8-dynamic).")
    parity: ParityConfig = Field(default_factory=ParityConfig, description="Tolerances of the fp32 export's parity check.")


# --------------------------------------------------------------------------- quantize
class VariantConfig(Section):
    name: str | None = Field(None, description="Folder name of the variant under output.dir (default: the scheme, plus method).")
    scheme: str = Field("none", description="A scheme of the registry (llmship/quantize/, one module each): none is the fp32 "
                        "export; an unknown name is an error listing them.")
    method: str | None = Field(None, description="Scheme method (default: the scheme's first; an unknown one is an error "
                               "listing the scheme's methods).")
    options: dict[str, Any] = Field(default_factory=dict, description="Scheme options, validated by the scheme (see docs).")
    exclude: list[str] = Field(
        default_factory=list, description="Node or weight names (fnmatch patterns) kept in float, e.g. '*lm_head*'."
    )
    parity: ParityConfig | None = Field(None, description="Parity tolerances for this variant (default: fitting its scheme).")
    auto: AutoConfig | None = Field(None, description="Mixed precision: keep the most sensitive layers at int8 or float until the goals pass (w4a16).")

    @property
    def variant_name(self) -> str:
        if self.name:
            return self.name
        from llmship.quantize import SCHEMES

        return SCHEMES[self.scheme].variant_name(self.method)

    @field_validator("scheme")
    @classmethod
    def _registered(cls, scheme: str) -> str:
        # Imported here: the package registers every scheme module (onnx, onnxruntime), which config need not load
        # until a variant is validated; the scheme modules import llmship.sections, never llmship.config.
        from llmship.quantize import SCHEMES

        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme '{scheme}'; known: {', '.join(sorted(SCHEMES))}")
        return scheme

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or "\\" in v or v.startswith(".")):
            raise ValueError("must be a plain folder name (no '/', '\\', or leading '.')")
        return v


class QuantizeConfig(VariantConfig):
    variants: list[VariantConfig] = Field(
        default_factory=list, description="More variants compiled in the same run, each like the fields above."
    )

    def all_variants(self) -> list[VariantConfig]:
        first = VariantConfig(**self.model_dump(exclude={"variants"}))
        return [first, *self.variants]


# --------------------------------------------------------------------------- calibration
class CalibSource(Section):
    kind: Literal["c4", "ceval", "alpaca"] = Field(..., description="Format of the source: c4, ceval or alpaca.")
    path: str = Field(EMBEDDED, description="Local file/folder in the official format, hub dataset id, or '@embedded'.")
    samples: int = Field(..., ge=1, description="Samples taken from this source.")


def _default_calib_sources() -> list[CalibSource]:
    # 128 samples in total, as GPTQ's --nsamples; split across the three sources llmship supports.
    return [
        CalibSource(kind="c4", samples=64),
        CalibSource(kind="ceval", samples=32),
        CalibSource(kind="alpaca", samples=32),
    ]


class CalibrationConfig(Section):
    sources: list[CalibSource] = Field(default_factory=_default_calib_sources, description="Mixture of sources and sample counts.")
    seq_len: int = Field(256, ge=8, description="Tokens per calibration sample (GPTQ uses 2048 on 7B models).")
    seed: int = Field(0, description="Seed of the sampling (GPTQ convention: 0).")
    allow_partial: bool = Field(False, description="Warn instead of failing when a source yields fewer samples than asked.")


# --------------------------------------------------------------------------- runtime
# The engines that run a compiled folder: the names of llmship.runtime.FOLDER_ENGINES (the registry).
FolderEngine = Literal["ort", "genai"]


class RuntimeConfig(Section):
    engine: FolderEngine = Field("ort", description="Engine for compiled variants in eval and bench: ort (ONNX Runtime) "
                                 "or genai (onnxruntime-genai).")
    provider: Literal["cpu", "cuda"] = Field("cpu", description="ONNX Runtime execution provider (cuda needs onnxruntime-gpu).")
    threads: int = Field(0, ge=0, description="Intra-op threads for ORT and torch (0 = the library default; the bench: physical cores).")


# --------------------------------------------------------------------------- bench
class BenchConfig(Section):
    dataset: str = Field(EMBEDDED, description="ShareGPT V3 JSON file, hub dataset id, or '@embedded'.")
    num_prompts: int = Field(16, ge=1, description="Requests sampled from the dataset.")
    seed: int = Field(0, description="Shuffle seed (vLLM benchmark default: 0).")
    output_len: int | None = Field(None, ge=1, description="Fixed output length; default: the length of the gpt reply.")
    min_len: int = Field(4, ge=1, description="Drop prompts or outputs shorter than this (vLLM: 4).")
    max_prompt_len: int = Field(1024, ge=1, description="Drop prompts longer than this (vLLM: 1024), clipped to max positions.")
    max_total_len: int = Field(2048, ge=2, description="Drop prompt+output longer than this (vLLM: 2048), clipped to max positions.")
    batch_size: int = Field(1, ge=1, description="Requests run together (grouped by length to limit padding).")
    warmup: int = Field(1, ge=0, description="Requests run before measuring, excluded from the figures.")
    baseline: bool = Field(True, description="Also run the PyTorch baseline on the same requests.")
    oversample: bool = Field(True, description="Top up to num_prompts by repeating sampled requests (vLLM default; off = --no-oversample).")
    isolate: bool = Field(True, description="Measure each engine in a fresh process (clean load time and peak RSS).")
    repeats: int = Field(1, ge=1, description="Timed runs of every engine (interleaved); figures are medians, with min-max.")


# --------------------------------------------------------------------------- eval
class CevalTask(Section):
    enabled: bool = Field(True, description="Score C-Eval.")
    path: str = Field(EMBEDDED, description="C-Eval folder (dev/ and val/ CSVs), 'ceval/ceval-exam', or '@embedded'.")
    modes: list[Literal["ppl", "gen"]] = Field(default_factory=lambda: ["ppl", "gen"], description="OpenCompass modes to run.")
    shots: int = Field(5, ge=0, le=5, description="Dev examples in each prompt (OpenCompass: the first 5).")
    subjects: list[str] | None = Field(None, description="Subjects to score (default: every subject present).")
    max_questions: int | None = Field(None, ge=1, description="Cap on val questions per subject (default: all).")
    max_out_len: int = Field(8, ge=1, description="GEN mode: new tokens generated per question.")
    max_seq_len: int | None = Field(None, ge=2, description="OpenCompass's max_seq_len: drop examples until a prompt "
                                    "fits, truncate at it (default: none dropped, truncate at max positions).")


class PerplexityTask(Section):
    enabled: bool = Field(True, description="Score perplexity on C4-format text and alpaca responses.")
    c4_path: str = Field(EMBEDDED, description="C4 JSON lines (.json or .json.gz) or '@embedded'.")
    alpaca_path: str = Field(EMBEDDED, description="alpaca-cleaned JSON list or '@embedded'.")
    seq_len: int = Field(256, ge=8, description="Window length for C4 perplexity.")
    windows: int = Field(16, ge=1, description="Non-overlapping windows scored (GPTQ convention, seed 0).")
    alpaca_samples: int = Field(32, ge=1, description="alpaca records whose responses are scored.")


class CmmluTask(Section):
    enabled: bool = Field(True, description="Score CMMLU.")
    path: str = Field(EMBEDDED, description="CMMLU folder (dev/ and test/ CSVs), 'haonan-li/cmmlu', or '@embedded'.")
    modes: list[Literal["ppl", "gen"]] = Field(default_factory=lambda: ["ppl", "gen"], description="OpenCompass modes "
                                               "to run (gen: the 5-shot cmmlu_gen_c13365 prompt, first capital letter).")
    shots: int = Field(5, ge=0, le=5, description="Dev examples in each prompt (OpenCompass: the first 5).")
    subjects: list[str] | None = Field(None, description="Subjects to score (default: every subject present).")
    max_questions: int | None = Field(None, ge=1, description="Cap on test questions per subject (default: all).")
    max_out_len: int = Field(8, ge=1, description="GEN mode: new tokens generated per question.")
    max_seq_len: int | None = Field(None, ge=2, description="OpenCompass's max_seq_len: drop examples until a prompt "
                                    "fits, truncate at it (default: none dropped, truncate at max positions).")


class EvalConfig(Section):
    ceval: CevalTask = Field(default_factory=CevalTask, description="C-Eval, OpenCompass style.")
    cmmlu: CmmluTask = Field(default_factory=CmmluTask, description="CMMLU, OpenCompass style.")
    perplexity: PerplexityTask = Field(default_factory=PerplexityTask, description="Perplexity tasks.")
    consistency_prompts: int = Field(16, ge=0, description="alpaca prompts for top-1 / KL / greedy-prefix consistency.")
    batch_size: int = Field(8, ge=1, description="Sequences scored together.")
    baseline_cache: bool = Field(True, description="Reuse baseline scores keyed by model fingerprint and eval config.")


# --------------------------------------------------------------------------- gate
# Metrics on a 0-100 scale (accuracies and agreements x100): a threshold outside [0, 100] can never be met (or always is).
PERCENT_METRIC_PREFIXES = ("ceval/", "cmmlu/")
PERCENT_METRICS = ("consistency/top1",)
# Metrics the eval produces: families whose names depend on the data's subjects (checked before scoring), then names.
METRIC_PREFIXES = ("ceval/ppl/", "ceval/gen/", "cmmlu/ppl/", "cmmlu/gen/")
METRIC_NAMES = ("ppl/c4", "ppl/alpaca", "consistency/top1", "consistency/kl", "consistency/greedy_prefix")
# Multiple-choice tasks: metric prefix -> the eval section that turns the task and its modes on.
CHOICE_TASKS = {"ceval/": "ceval", "cmmlu/": "cmmlu"}


def is_percent_metric(metric: str) -> bool:
    return metric.startswith(PERCENT_METRIC_PREFIXES) or metric in PERCENT_METRICS


def has_interval(metric: str) -> bool:
    """Metrics built from per-question (per-prompt) outcomes, which llmship.eval.intervals resamples."""
    return is_percent_metric(metric)


class Goal(Section):
    metric: str = Field(..., description="Metric name from the eval summary, e.g. 'ceval/ppl/average' or 'ppl/c4'.")
    type: Literal["threshold", "max-degradation", "percent-max-degradation"] = Field(..., description="Kind of goal.")
    value: float = Field(..., description="Threshold, or allowed absolute / percent degradation against the baseline.")
    higher_is_better: bool | None = Field(None, description="Direction of the metric (default: inferred from its name).")
    variants: list[str] | None = Field(None, description="Variants the goal applies to (default: all).")
    judge: Literal["point", "interval"] | None = Field(
        None, description="point: the measured value; interval: the worse end of its 95% paired interval, so a pass "
        "shows the goal holds beyond sampling noise (default: interval for accuracy metrics, point for the rest).")

    @field_validator("metric")
    @classmethod
    def _known_family(cls, metric: str) -> str:
        if not (metric.startswith(METRIC_PREFIXES) or metric in METRIC_NAMES):
            raise ValueError(f"no eval task produces '{metric}'; metrics are ceval/<ppl|gen>/<subject|stem|"
                             "social-science|humanities|other|hard|average|agreement>, cmmlu/<ppl|gen>/<subject|stem|"
                             "social-science|humanities|other|china-specific|average|agreement>, ppl/c4, ppl/alpaca, "
                             "consistency/<top1|kl|greedy_prefix>")
        return metric

    @field_validator("value")
    @classmethod
    def _can_be_met(cls, value: float, info: Any) -> float:
        """Reject goals that no variant can meet (or that every variant meets) by definition."""
        kind, metric = info.data.get("type"), info.data.get("metric")
        if kind == "threshold" and metric and is_percent_metric(metric) and not 0.0 <= value <= 100.0:
            raise ValueError(f"threshold {value:g} on {metric}, a percentage (0-100)")
        if kind == "max-degradation" and value < 0:
            raise ValueError(f"allowed degradation {value:g} is negative (a variant would have to beat the baseline)")
        if kind == "percent-max-degradation" and not 0.0 <= value < 100.0:
            raise ValueError(f"allowed degradation {value:g}% is outside [0, 100)")
        return value

    @field_validator("judge")
    @classmethod
    def _interval_exists(cls, judge: str | None, info: Any) -> str | None:
        metric = info.data.get("metric")
        if judge == "interval" and metric and not has_interval(metric):
            raise ValueError(f"{metric} has no interval (only accuracies, agreements and consistency/top1 do); "
                             "use judge: point")
        return judge

    @property
    def judged_by_interval(self) -> bool:
        return self.judge == "interval" or (self.judge is None and has_interval(self.metric))


class GateConfig(Section):
    goals: list[Goal] = Field(default_factory=list, description="Goals every variant must meet.")
    baseline_json: str | None = Field(None, description="Stored baseline results to compare against instead of re-scoring.")


# --------------------------------------------------------------------------- cluster
class ClusterConfig(Section):
    """`cluster:`: where units of work run (llmship.cluster): here, or as Ray tasks; local changes nothing."""

    backend: Literal["local", "ray"] = Field("local", description="local: this process, as without a cluster (Ray is "
                                             "not imported); ray: units of work fanned out as Ray tasks (llmship[ray]).")
    address: str = Field("", description="Ray cluster: '' starts a Ray on this machine, 'auto' joins the one `ray start` "
                         "runs here, 'ray://host:10001' a remote one through Ray Client.")
    num_cpus: float = Field(1, ge=0, description="CPUs each task reserves (set runtime.threads to match: the same threads "
                            "give the same answers as a local run).")
    num_gpus: float = Field(0, ge=0, description="GPUs each task reserves (runtime.provider: cuda on GPU nodes).")
    max_retries: int = Field(2, ge=0, description="Retries of a unit whose worker process died (killed, out of memory, "
                             "node lost) before the run stops naming the unit.")
    bench_resource: str | None = Field(None, description="Custom resource of the bench nodes (`ray start --resources "
                                       "'{\"bench-node\": 1}'`): each engine is benchmarked on one of them, one engine "
                                       "per node at a time; unset: the bench runs here.")


# --------------------------------------------------------------------------- output
class OutputConfig(Section):
    dir: str = Field("llmship-out", description="Folder that receives variants, eval, bench and the report.")


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Source model.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="ONNX export and parity.")
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig, description="Variant(s) to compile.")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig, description="Calibration data.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Engine settings shared by all stages.")
    bench: BenchConfig = Field(default_factory=BenchConfig, description="Throughput and latency benchmark.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Accuracy evaluation.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Regression gate.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where results go.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Where units of work run: here, or on a Ray cluster.")
    _source: str = PrivateAttr("<defaults>")

    @model_validator(mode="after")
    def _unique_variant_names(self) -> Config:
        names = [v.variant_name for v in self.quantize.all_variants()]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"variant names must be unique, repeated: {', '.join(dup)} (set `name:`)")
        return self

    @field_validator("gate")
    @classmethod
    def _goals_measured(cls, gate: GateConfig, info: Any) -> GateConfig:
        """A goal on a task this config turns off could never be measured."""
        ev = info.data.get("eval")
        if ev is None:
            return gate
        for i, goal in enumerate(gate.goals):
            family = next((f for f in CHOICE_TASKS if goal.metric.startswith(f)), None)
            task = getattr(ev, CHOICE_TASKS[family]) if family else None
            off = ((task is not None and (not task.enabled or goal.metric.split("/")[1] not in task.modes))
                   or (goal.metric.startswith("ppl/") and not ev.perplexity.enabled)
                   or (goal.metric.startswith("consistency/") and ev.consistency_prompts == 0))
            if off:
                raise ValueError(f"goals.{i}: {goal.metric} is not measured with this eval config (its task or mode is off)")
        return gate


# --------------------------------------------------------------------------- loading
def _yaml_lines(text: str) -> dict[tuple, int]:
    """Map each key/item path in the YAML document to its 1-based line."""
    lines: dict[tuple, int] = {}

    def walk(node: yaml.Node, path: tuple) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, str(key.value))
                lines[sub] = key.start_mark.line + 1
                walk(value, sub)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


def _known_fields(model: type[BaseModel], path: tuple) -> list[str] | None:
    """Field names of the section at `path` (None when the path does not reach a section)."""
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        for cand in (ann, *getattr(ann, "__args__", ())):
            inner = getattr(cand, "__args__", None)
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
            if inner and isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
                model = inner[0]
                break
        else:
            return None
    return list(model.model_fields)


# Fields that moved to another section: (old location) -> new dotted name.
MOVED_FIELDS = {("bench", "engine"): "runtime.engine"}


def _describe(err: dict, source: str, lines: dict[tuple, int]) -> str:
    loc = tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc) or "<top>"
    line = None
    for cut in range(len(loc), -1, -1):
        if loc[:cut] in lines:
            line = lines[loc[:cut]]
            break
    where = f"{source}:{line}" if line else source
    if err["type"] == "extra_forbidden" and loc in MOVED_FIELDS:
        return f"{where}: '{dotted}' moved to '{MOVED_FIELDS[loc]}'"
    if err["type"] == "extra_forbidden":
        known = _known_fields(Config, loc[:-1]) or []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        did = f"; did you mean '{hint[0]}'?" if hint else ""
        return f"{where}: unknown key '{dotted}'; known keys here: {', '.join(known)}{did}"
    got = err.get("input")
    got_s = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    return f"{where}: field '{dotted}': {err['msg']}{got_s}"


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"override '{dotted}': '{part}' is not an index of a list of {len(node)}", where=source)
            key: Any = int(part)
        elif isinstance(node, dict):
            key = part
        else:
            raise UserError(f"override '{dotted}': '{'.'.join(parts[:i])}' is not a section", where=source)
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]


def _field_annotation(dotted: str) -> Any:
    """Annotation of the field a dotted override names (None when the path is not a field)."""
    model: type[BaseModel] = Config
    ann: Any = None
    for part in dotted.split("."):
        if part.isdigit():
            continue
        field = model.model_fields.get(part) if model is not None else None
        if field is None:
            return None
        ann = field.annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else _item_model(ann)
    return ann


def _is_text_field(ann: Any) -> bool:
    """`str` or `str | None` (lists, dicts and literals are read as YAML)."""
    if ann is str:
        return True
    return get_origin(ann) in (Union, types.UnionType) and set(get_args(ann)) == {str, type(None)}


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key=value` pairs; the value is read as YAML, except for text fields, which take it verbatim (so
    `output.dir=2024` or `model.revision=0123` stay strings); `null` still clears an optional text field."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            raise UserError(f"override '{item}' is not of the form section.field=value", where="command line")
        if _is_text_field(_field_annotation(key)) and raw not in ("null", "~"):
            parsed.append((key, raw))
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (None = all defaults), apply dotted overrides, validate."""
    source = str(path) if path is not None else "<defaults>"
    text = ""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError("config file not found", where=source)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read config: {exc}", where=source) from None
    try:
        tree = yaml.safe_load(text) if text.strip() else {}
        lines = _yaml_lines(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"malformed YAML: {problem}", where=where) from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise UserError(f"the top level must be a mapping of sections, got {type(tree).__name__}", where=source)
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        raise UserError(_describe(exc.errors()[0], source, lines)) from None
    if overrides:
        # Overrides apply to the resolved tree (defaults included), so list items that only exist as defaults
        # (calibration.sources.0.samples) can be overridden too.
        tree = resolved_tree(cfg)
        for key, value in parse_overrides(overrides):
            _set_dotted(tree, key, value, source=f"override {key}")
        try:
            cfg = Config.model_validate(tree)
        except ValidationError as exc:
            raise UserError(_describe(exc.errors()[0], "command-line override", {})) from None
    cfg._source = source
    return cfg


def resolved_tree(cfg: Config, mode: Literal["python", "json"] = "python") -> dict[str, Any]:
    """Every field of the config, defaults included: model_dump plus the fields it leaves out of stage keys
    (`model.baseline`), so that rebuilding a Config from the tree (overrides, `config show`) keeps them."""
    tree = cfg.model_dump(mode=mode, exclude_unset=False)
    tree["model"]["baseline"] = cfg.model.baseline
    return tree


def resolve_path(value: str, base: Path | None = None) -> Path | str:
    """Local paths become Paths (relative to `base` when given); other strings (hub ids) pass through."""
    p = Path(value).expanduser()
    if base is not None and not p.is_absolute():
        p = base / p
    return p


def _type_name(ann: Any) -> str:
    args = getattr(ann, "__args__", ())
    if getattr(ann, "__origin__", None) is Literal:
        return "|".join(str(a) for a in args)
    if isinstance(ann, type):
        return ann.__name__
    return str(ann).replace("typing.", "").replace("llmship.config.", "")


def _item_model(ann: Any) -> type[BaseModel] | None:
    """The section class of a `list[Section]` or `Section | None` field."""
    for cand in getattr(ann, "__args__", ()):
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return cand
        inner = _item_model(cand)
        if inner is not None:
            return inner
    return None


def schema_text() -> str:
    """Every field with its type, default and one-line description, as `llmship config schema` prints it."""
    out: list[str] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            dotted = f"{prefix}{name}"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out.append(f"{dotted}:  # {field.description}")
                walk(ann, dotted + ".")
                continue
            default = field.get_default(call_default_factory=True) if not field.is_required() else "<required>"
            if isinstance(default, list) and default and isinstance(default[0], BaseModel):
                default = [d.model_dump(exclude_defaults=True) for d in default]
            out.append(f"{dotted} ({_type_name(ann)}) = {default!r}  # {field.description}")
            item = _item_model(ann)
            if item is not None and item is not model:
                walk(item, f"{dotted}[]." if str(ann).startswith("list") else f"{dotted}.")

    walk(Config, "")
    return "\n".join(out)
