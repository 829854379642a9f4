"""`llmship` command line: a thin layer over the stage entry points in llmship.pipeline.

Exit codes: 0 ok, 1 a gate or parity check failed, 2 bad input.
Logs and progress go to stderr; results go to files under `output.dir`.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from llmship.errors import CheckFailed, UserError
from llmship.progress import stderr

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Export, quantize, evaluate and benchmark LLaMA-family models for ONNX Runtime.",
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the YAML config format.", no_args_is_help=True)
app.add_typer(config_app, name="config")

log = logging.getLogger("llmship")

ConfigArg = Annotated[str, typer.Argument(help="YAML config file (see `llmship config schema`).")]
OverridesArg = Annotated[
    list[str] | None, typer.Argument(help="Dotted overrides applied after the file, e.g. model.path=./m output.dir=./out.")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, warnings and errors only.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo every stage even when a valid cached result exists.")]


def _setup_logging(quiet: bool, debug: bool) -> None:
    from rich.logging import RichHandler

    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    handler = RichHandler(console=stderr, show_path=False, show_time=False, markup=False)
    # Libraries log to the root logger at INFO (onnxruntime's quantizer: one line per tensor); only llmship's own
    # logger speaks at INFO, everything else at WARNING (DEBUG everywhere with --debug).
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    log.setLevel(level)
    # torch resets the level of its "torch" logger on import, so the exporter's chatty child is named too.
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub", "onnxscript", "torch", "onnx_ir",
                  "torch.onnx._internal.exporter._registration", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    handler.addFilter(_drop_library_nags)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars, on stderr


# Advice libraries log at WARNING on every call that is not about the user's run (onnxruntime's quantizer asks for its
# shape-inference pre-processing, which llmship's exported graphs do not need: they carry their shapes).
_LIBRARY_NAGS = ("Please consider to run pre-processing before quantization",)


def _drop_library_nags(record: logging.LogRecord) -> bool:
    return not any(record.getMessage().startswith(nag) for nag in _LIBRARY_NAGS)


def _guarded(work: Callable[[], None], debug: bool) -> None:
    """Run `work`, turning llmship's exceptions into exit codes and one-line messages."""
    try:
        work()
    except UserError as exc:
        if debug:
            traceback.print_exc()
        stderr.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except CheckFailed as exc:
        if debug:
            traceback.print_exc()
        stderr.print(f"[bold red]check failed:[/] {escape(str(exc))}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            _internal_error(exc, debug)
        if debug:
            traceback.print_exc()
        where = f" ({exc.filename})" if exc.filename else ""
        stderr.print(f"[bold red]error:[/] cannot write output{escape(where)}: {exc.strerror}; earlier outputs are unchanged",
                     markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        stderr.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:  # a bug: one line unless --debug
        _internal_error(exc, debug)


# A full disk, a quota or a file-size limit is the user's environment, not a bug.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS}


def _internal_error(exc: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(exc)
    else:
        stderr.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(str(exc))} (rerun with --debug for the traceback)",
                     markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(3) from None


def _verb(stage: str, config: str | None, overrides: list[str] | None, quiet: bool, debug: bool, force: bool) -> None:
    _setup_logging(quiet, debug)

    def work() -> None:
        from llmship import pipeline
        from llmship.config import load_config

        cfg = load_config(config, overrides or [])
        pipeline.run_stage(stage, cfg, quiet=quiet, force=force)

    _guarded(work, debug)


@app.command()
def compile(config: ConfigArg, overrides: OverridesArg = None, quiet: QuietOpt = False, debug: DebugOpt = False,
            force: ForceOpt = False) -> None:
    """Export the model to ONNX and build every variant the YAML lists (each checked against PyTorch)."""
    _verb("compile", config, overrides, quiet, debug, force)


@app.command()
def eval(config: ConfigArg, overrides: OverridesArg = None, quiet: QuietOpt = False, debug: DebugOpt = False,
         force: ForceOpt = False) -> None:
    """Score the PyTorch baseline and every compiled variant (C-Eval, perplexity) and apply the gate."""
    _verb("eval", config, overrides, quiet, debug, force)


@app.command()
def bench(config: ConfigArg, overrides: OverridesArg = None, quiet: QuietOpt = False, debug: DebugOpt = False,
          force: ForceOpt = False) -> None:
    """Measure throughput and latency on ShareGPT prompts against the PyTorch baseline."""
    _verb("bench", config, overrides, quiet, debug, force)


@app.command()
def run(config: ConfigArg, overrides: OverridesArg = None, quiet: QuietOpt = False, debug: DebugOpt = False,
        force: ForceOpt = False) -> None:
    """compile -> eval -> gate -> bench -> report, with cached stages reused."""
    _verb("run", config, overrides, quiet, debug, force)


@app.command()
def demo(overrides: OverridesArg = None, quiet: QuietOpt = False, debug: DebugOpt = False, force: ForceOpt = False) -> None:
    """Run the whole chain on the bundled tiny model and samples (no network)."""
    from llmship.pipeline import DEMO_CONFIG

    _verb("run", str(DEMO_CONFIG), overrides, quiet, debug, force)


VerbOpt = Annotated[str, typer.Option("--verb", help="The verb whose inputs are checked: compile, eval, bench or run.")]


@app.command()
def check(config: ConfigArg, overrides: OverridesArg = None, verb: VerbOpt = "run", debug: DebugOpt = False) -> None:
    """Only the preflight: check every input the verb would read and print what is read from where (exit 0 or 2)."""
    _setup_logging(False, debug)

    def work() -> None:
        from llmship import pipeline, preflight
        from llmship.config import load_config

        if verb not in preflight.VERBS:
            raise UserError(f"unknown verb '{verb}'; choose one of: {', '.join(preflight.VERBS)}", where="--verb")
        cfg = load_config(config, overrides or [])
        _, plan = pipeline.check_inputs(cfg, verb)
        _print_plan(plan)

    _guarded(work, debug)


def _print_plan(plan: Any) -> None:
    from rich.table import Table

    from llmship.preflight import table_rows

    table = Table(title=f"llmship {plan.verb}: what is read from where", title_justify="left")
    for column in ("field", "what", "from", "checked", "read by"):
        table.add_column(column, overflow="fold")
    for row in table_rows(plan):
        table.add_row(*row)
    Console(soft_wrap=False, width=max(160, Console().width)).print(table)
    for line in plan.skipped:
        typer.echo(line)
    typer.echo(f"ok: {len(plan.sources)} input(s) checked for `llmship {plan.verb}`")


@config_app.command("schema")
def config_schema() -> None:
    """Print every config field with its type, default and description."""
    from llmship.config import schema_text

    typer.echo(schema_text())


@config_app.command("show")
def config_show(config: ConfigArg, overrides: OverridesArg = None, debug: DebugOpt = False) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    _setup_logging(True, debug)

    def work() -> None:
        import yaml

        from llmship.config import load_config, resolved_tree

        cfg = load_config(config, overrides or [])
        typer.echo(yaml.safe_dump(resolved_tree(cfg, mode="json"), sort_keys=False, allow_unicode=True))

    _guarded(work, debug)


def main() -> None:
    try:
        app()
    except SystemExit as exc:
        sys.exit(exc.code)


if __name__ == "__main__":
    main()
