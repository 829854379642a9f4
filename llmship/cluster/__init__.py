"""Units of work fanned out over a Ray cluster (`cluster.backend: ray`); Ray is never imported otherwise.

Ray does the scheduling, the retries and the object transport; this module only
- connects (`connected`): '' starts a Ray on this machine, 'auto' joins the one `ray start` runs here, 'ray://...'
  goes through Ray Client; a Ray already initialised in this process (tests) is used as it is;
- checks the shared filesystem (`probe_nodes`): one task pinned to each alive node reads a token the driver wrote
  under output.dir and fingerprints every input path, so a node that does not see the same files stops the run
  before any unit is scheduled (exit 2 naming the node and the path);
- runs units (`run_units`): one Ray task per unit, each retried `max_retries` times when its worker process dies
  or it raises, results handed back as they finish (one aggregated progress bar on the driver); a unit that still
  fails stops the run with one line naming it (exit 2; a failed parity check or gate stays exit 1).
"""

from __future__ import annotations

import functools
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmship.cache import folder_fingerprint
from llmship.config import ClusterConfig
from llmship.errors import CheckFailed, UserError
from llmship.files import write_atomic

log = logging.getLogger("llmship")

EXTRA = "llmship[ray]"
PROBE_FILE = Path(".llmship") / "cluster-probe"  # under output.dir: the token each node must read back


MISSING = f"Ray is not installed: pip install '{EXTRA}' (or set cluster.backend: local)"


def ray_version() -> str | None:
    """The installed Ray's version, None when it is absent (nothing imported: the preflight asks this)."""
    from importlib.metadata import PackageNotFoundError, version
    from importlib.util import find_spec

    try:
        if find_spec("ray") is None:
            return None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules (blocked)
        return None
    try:
        return version("ray")
    except PackageNotFoundError:
        return "unknown"


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(MISSING, where="cluster.backend") from None
    return ray


@contextmanager
def connected(cluster: ClusterConfig) -> Iterator[Any]:
    """The `ray` module, connected to the configured cluster; disconnected on exit when this call connected it."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    # Starting a Ray here: no dashboard (plain `ray` lacks its packages), worker logs kept out of our stderr.
    options: dict[str, Any] = {"include_dashboard": False} if not cluster.address else {}
    try:
        ray.init(address=cluster.address or None, log_to_driver=False, configure_logging=False, **options)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        raise UserError(f"cannot reach the Ray cluster: {first_line(exc)}",
                        where=f"cluster.address ({cluster.address!r})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def alive_nodes(ray: Any) -> list[dict[str, Any]]:
    return [node for node in ray.nodes() if node.get("Alive")]


@functools.cache  # a worker process stays on its node
def this_node() -> str:
    """Inside a Ray task: the name `node_name` gives the node it runs on."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    return next((node_name(node) for node in alive_nodes(ray) if node["NodeID"] == node_id), node_id[:8])


def require_resource(ray: Any, resource: str, field_name: str) -> None:
    """UserError unless some alive node carries the custom resource (a task asking for it would wait forever)."""
    if not any(node.get("Resources", {}).get(resource) for node in alive_nodes(ray)):
        raise UserError(f"no node of the Ray cluster carries the resource {resource!r} (start the bench nodes with "
                        f"`ray start --resources '{{\"{resource}\": 1}}'`)", where=field_name)


def node_name(node: Mapping[str, Any]) -> str:
    """How messages and reports name a node: its address and the first characters of its id."""
    return f"{node.get('NodeManagerAddress', '?')} ({str(node.get('NodeID', ''))[:8]})"


def _fingerprint(path: str) -> str | None:
    return folder_fingerprint(path) if Path(path).exists() else None


def _probe(token_file: str, paths: dict[str, str]) -> dict[str, Any]:
    """On one node: the token under output.dir and the fingerprint of every path (None where it is absent)."""
    file = Path(token_file)
    token = file.read_text(encoding="utf-8") if file.is_file() else None
    return {"token": token, "paths": {label: _fingerprint(path) for label, path in paths.items()}}


def probe_nodes(ray: Any, out: Path, paths: Mapping[str, str | Path]) -> list[str]:
    """Every alive node sees output.dir (the same folder, not one of the same name) and every path with the driver's
    fingerprint; UserError naming the node and the path otherwise. Returns the names of the nodes probed."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = secrets.token_hex(8)
    token_file = write_atomic(Path(out) / PROBE_FILE, token)
    wanted = {label: str(path) for label, path in paths.items()}
    expected = {label: _fingerprint(path) for label, path in wanted.items()}
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    nodes = alive_nodes(ray)
    found = ray.get([probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                     .remote(str(token_file), wanted) for node in nodes])
    for node, seen in zip(nodes, found, strict=True):
        if seen["token"] != token:
            raise UserError(f"node {node_name(node)} does not see {out} (output.dir must be on a filesystem every node "
                            "shares)", where="output.dir")
        for label, fingerprint in seen["paths"].items():
            if fingerprint is None:
                raise UserError(f"node {node_name(node)} does not see {wanted[label]} (every input must be on a "
                                "filesystem every node shares)", where=label)
            if fingerprint != expected[label]:
                raise UserError(f"node {node_name(node)} sees other files at {wanted[label]} than this machine "
                                f"(fingerprint {fingerprint}, here {expected[label]})", where=label)
    token_file.unlink(missing_ok=True)
    log.info("cluster: %d node(s) see output.dir and %d input path(s)", len(nodes), len(wanted))
    return [node_name(node) for node in nodes]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def attempts(cluster: ClusterConfig, reason: str) -> str:
    return f"failed on all {cluster.max_retries + 1} attempt(s) (cluster.max_retries {cluster.max_retries}): {reason}"


@dataclass(frozen=True)
class Unit:
    """One Ray task: `label` names it in messages, `args` go to the remote function."""

    label: str
    args: tuple[Any, ...]
    resources: dict[str, float] = field(default_factory=dict)  # custom resources it needs (bench: the node label)


def task_options(cluster: ClusterConfig) -> dict[str, Any]:
    # Exceptions are retried as well as dead workers: on a cluster most are transient (a GPU out of memory, a
    # filesystem hiccup); bad inputs were refused by the preflight before any unit ran.
    return {"num_cpus": cluster.num_cpus, "num_gpus": cluster.num_gpus, "max_retries": cluster.max_retries,
            "retry_exceptions": True}


def run_units(ray: Any, cluster: ClusterConfig, function: Callable[..., Any], units: list[Unit],
              on_result: Callable[[Unit, Any], None]) -> None:
    """Each unit as a Ray task of `function(*unit.args)`; `on_result(unit, result)` on the driver as each finishes.
    The first unit that fails for good stops the run (the others are cancelled) with one line naming it."""
    from ray.exceptions import RayError, RayTaskError

    remote = ray.remote(**task_options(cluster))(function)
    pending = {remote.options(resources=unit.resources or None).remote(*unit.args): unit for unit in units}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            unit = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except RayTaskError as exc:
                cause = exc.cause
                if isinstance(cause, UserError):
                    raise UserError(str(cause), where=unit.label) from None
                if isinstance(cause, CheckFailed):
                    raise CheckFailed(f"{unit.label}: {cause}") from None
                raise UserError(attempts(cluster, f"{type(cause).__name__}: {first_line(cause)}"),
                                where=unit.label) from cause  # the cause: its traceback with --debug
            except RayError as exc:
                raise UserError(attempts(cluster, f"{type(exc).__name__}: {first_line(exc)}"), where=unit.label) from None
            on_result(unit, result)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
