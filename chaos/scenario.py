"""Scenarios: a cluster, a workload, a timeline of faults, a steady-state hypothesis and the
invariants to check. Written in YAML (schema in ``docs/chaos.md``) or built in Python with
these dataclasses; :func:`load` parses and validates either a file, a library name or a dict.

    name: writer-crash
    description: The writer's process is killed under load; a reader is promoted.
    cluster: {flavour: aurora-pg, readers: 2, timeline: {detection_delay: 0.5}}
    workload: {threads: 2, write_ratio: 0.8, rate: 50, tx_size: 1, plugins: failover}
    duration: 8
    faults:
      - {at: 2, action: failover}
    steady_state: {success_ratio: 0.95}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from chaos.faults import FaultError, Toxic

__all__ = [
    "ACTIONS",
    "ENGINE_FLAVOURS",
    "INVARIANTS",
    "ClusterSpec",
    "FaultStep",
    "Scenario",
    "ScenarioError",
    "SteadyState",
    "WorkloadSpec",
    "library",
    "load",
]

#: Timeline actions and the fields each takes (besides ``at``).
ACTIONS: Mapping[str, tuple[str, ...]] = {
    "toxic": ("instance", "toxic", "duration", "repeat", "every"),
    "failover": ("target", "mode"),
    "kill": ("instance",),
    "reboot": ("instance",),
    "replica_lag": ("instance", "seconds", "duration"),
    "dns_staleness": ("seconds",),
    # A new password in the workload's Secrets Manager secret and on the database
    # (chaos/secrets.py): the application logs in with the secret.
    "rotate_secret": (),
    # A blue/green deployment of the cluster (a green cluster of the same shape is started,
    # paired and switched over to; simulator only): the application should use the
    # blue_green plugin (AWS bg).
    "bluegreen_switchover": (),
}
#: Invariants checked after every run (all by default).
INVARIANTS: tuple[str, ...] = ("no_lost_writes", "no_reader_writes", "documented_errors")
#: Short engine names accepted by ``--flavour`` and the flavour each stands for.
ENGINE_FLAVOURS: Mapping[str, str] = {"pg": "aurora-pg", "postgresql": "aurora-pg",
                                      "mysql": "aurora-mysql", "mariadb": "aurora-mysql"}
SUPPORTED_FLAVOURS = ("aurora-pg", "aurora-mysql")


class ScenarioError(ValueError):
    """A scenario is malformed; the message names the field and the fix."""


def _number(where: str, value: Any, *, minimum: float = 0.0, integer: bool = False,
            allow_none: bool = False) -> Any:
    if value is None and allow_none:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value < minimum:
        kind = "a whole number" if integer else "a number"
        raise ScenarioError(f"{where}: expected {kind} >= {minimum:g}, got {value!r}")
    return value


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ScenarioError(f"{where}: expected a mapping, got {type(value).__name__}")
    return dict(value)


def _only(where: str, data: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ScenarioError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                            f"allowed: {', '.join(allowed)}")


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """The simulated cluster: flavour, number of readers, control-plane delays (the fields of
    :class:`simulator.cluster.Timeline`)."""

    flavour: str = "aurora-pg"
    readers: int = 2
    timeline: Mapping[str, float | None] = dataclasses.field(default_factory=dict)

    @property
    def engine(self) -> str:
        return "mysql" if "mysql" in self.flavour else "pg"


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    """The application: ``threads`` connections, each doing ``rate`` operations a second
    (0: as fast as it can), a fraction ``write_ratio`` of them writes of ``tx_size`` rows in
    one transaction (1: autocommit), reads on the ``reads`` endpoint (``writer`` or
    ``reader``; ``split``: on the writer endpoint's connection, each read between
    ``read_only = True`` and ``False``, which ``read_write_splitting`` in ``plugins`` moves to
    a reader and back), through resilient_db with ``plugins`` (a code ending in ``?`` is used only
    if this resilient_db has it, e.g. ``failover,efm?``) and ``properties``. Each thread
    closes its connection and opens a new one every ``reconnect_every`` operations (0:
    never), as an application with short-lived connections does."""

    threads: int = 2
    write_ratio: float = 0.8
    rate: float = 50.0
    tx_size: int = 1
    reads: str = "writer"
    plugins: str = "failover"
    properties: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reconnect_every: int = 0


@dataclasses.dataclass(frozen=True)
class FaultStep:
    """One timeline entry: at ``at`` seconds into the run, do ``action``.

    ``instance``: ``writer``, ``reader`` (the first reader), ``reader-2`` (the second), or an
    instance id (``instance-3``), resolved when the step runs. ``duration``: how long a toxic
    or a replica lag lasts (``None``: to the end). ``repeat``/``every``: apply a toxic
    ``repeat`` times, ``every`` seconds apart (flapping). ``target``: a failover target (an
    instance selector, ``None``: the simulator picks the most advanced reader). ``mode``:
    ``crash`` or ``graceful``. ``seconds``: lag or DNS staleness."""

    at: float
    action: str
    instance: str | None = None
    toxic: Toxic | None = None
    duration: float | None = None
    repeat: int = 1
    every: float | None = None
    target: str | None = None
    mode: str = "crash"
    seconds: float | None = None

    def describe(self) -> str:
        if self.action == "toxic":
            assert self.toxic is not None
            text = f"{self.toxic.describe()} on {self.instance}"
            if self.duration is not None:
                text += f" for {self.duration:g} s"
            if self.repeat > 1:
                text += f", {self.repeat} times every {self.every:g} s"
            return text
        if self.action == "failover":
            return f"failover ({self.mode})" + (f" to {self.target}" if self.target else "")
        if self.action in ("kill", "reboot"):
            return f"{self.action} {self.instance}"
        if self.action == "replica_lag":
            return f"replica lag {self.seconds:g} s on {self.instance}"
        if self.action == "rotate_secret":
            return "rotate the secret and the database password"
        if self.action == "bluegreen_switchover":
            return "blue/green switchover"
        return f"DNS staleness {self.seconds:g} s"

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["toxic"] = self.toxic.to_json() if self.toxic else None
        keep = ("at", "action", *ACTIONS[self.action])
        return {k: v for k, v in data.items()
                if v is not None and k in keep and not (k == "repeat" and v == 1)}


@dataclasses.dataclass(frozen=True)
class SteadyState:
    """The hypothesis: before the first fault and over the last ``window`` seconds of the run
    at least ``success_ratio`` of the operations succeed; optional bounds on the longest
    write gap (``max_downtime``) and on the time from ``promoted`` to the first write on the
    new writer (``max_recovery``), in seconds (``None``: not checked)."""

    success_ratio: float = 0.95
    window: float = 2.0
    max_downtime: float | None = None
    max_recovery: float | None = None


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    description: str = ""
    cluster: ClusterSpec = dataclasses.field(default_factory=ClusterSpec)
    workload: WorkloadSpec = dataclasses.field(default_factory=WorkloadSpec)
    duration: float = 8.0
    faults: tuple[FaultStep, ...] = ()
    steady_state: SteadyState = dataclasses.field(default_factory=SteadyState)
    invariants: tuple[str, ...] = INVARIANTS
    #: Error type names the application may see besides resilient_db's documented ones.
    allowed_errors: tuple[str, ...] = ()

    def with_flavour(self, flavour: str | None) -> Scenario:
        """This scenario on another flavour (``pg``/``mysql`` or a flavour name)."""
        if flavour is None:
            return self
        name = ENGINE_FLAVOURS.get(flavour, flavour)
        if name not in SUPPORTED_FLAVOURS:
            raise ScenarioError(f"--flavour {flavour!r}: expected one of pg, mysql, "
                                f"{', '.join(SUPPORTED_FLAVOURS)}")
        return dataclasses.replace(self, cluster=dataclasses.replace(self.cluster, flavour=name))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "description": self.description,
            "cluster": {"flavour": self.cluster.flavour, "readers": self.cluster.readers,
                        "timeline": dict(self.cluster.timeline)},
            "workload": {**dataclasses.asdict(self.workload),
                         "properties": dict(self.workload.properties)},
            "duration": self.duration,
            "faults": [f.to_json() for f in self.faults],
            "steady_state": dataclasses.asdict(self.steady_state),
            "invariants": list(self.invariants),
            "allowed_errors": list(self.allowed_errors),
        }


_TIMELINE_FIELDS = ("detection_delay", "promotion_delay", "dns_staleness", "rejoin_delay",
                    "reboot_downtime", "switchover_phase")


def _cluster(data: Any) -> ClusterSpec:
    d = _mapping("cluster", data)
    _only("cluster", d, ("flavour", "readers", "timeline"))
    flavour = d.get("flavour", "aurora-pg")
    flavour = ENGINE_FLAVOURS.get(flavour, flavour)
    if flavour not in SUPPORTED_FLAVOURS:
        raise ScenarioError(f"cluster.flavour {flavour!r}: expected one of "
                            f"{', '.join(SUPPORTED_FLAVOURS)} (or pg, mysql)")
    readers = _number("cluster.readers", d.get("readers", 2), minimum=1, integer=True)
    timeline = _mapping("cluster.timeline", d.get("timeline"))
    _only("cluster.timeline", timeline, _TIMELINE_FIELDS)
    for key, value in timeline.items():
        _number(f"cluster.timeline.{key}", value, allow_none=key == "rejoin_delay")
    return ClusterSpec(flavour, readers, timeline)


def _workload(data: Any) -> WorkloadSpec:
    d = _mapping("workload", data)
    fields = [f.name for f in dataclasses.fields(WorkloadSpec)]
    _only("workload", d, fields)
    threads = _number("workload.threads", d.get("threads", 2), minimum=1, integer=True)
    ratio = _number("workload.write_ratio", d.get("write_ratio", 0.8))
    if ratio > 1:
        raise ScenarioError(f"workload.write_ratio: expected a fraction in [0, 1], got {ratio!r}")
    rate = _number("workload.rate", d.get("rate", 50.0))
    tx_size = _number("workload.tx_size", d.get("tx_size", 1), minimum=1, integer=True)
    reads = d.get("reads", "writer")
    if reads not in ("writer", "reader", "split"):
        raise ScenarioError(f"workload.reads {reads!r}: expected writer, reader or split")
    plugins = d.get("plugins", "failover")
    if isinstance(plugins, (list, tuple)):
        plugins = ",".join(str(p) for p in plugins)
    if not isinstance(plugins, str):
        raise ScenarioError(f"workload.plugins: expected a comma-separated string or a list, "
                            f"got {plugins!r}")
    if reads == "split" and "read_write_splitting" not in plugins.replace(" ", "").split(","):
        raise ScenarioError("workload.reads 'split' moves reads with read_only: add "
                            "read_write_splitting to workload.plugins")
    properties = _mapping("workload.properties", d.get("properties"))
    reconnect_every = _number("workload.reconnect_every", d.get("reconnect_every", 0),
                              integer=True)
    return WorkloadSpec(threads, float(ratio), float(rate), tx_size, reads, plugins, properties,
                        reconnect_every)


def _toxic(where: str, data: Any) -> Toxic:
    if isinstance(data, str):
        data = {"type": data}
    d = _mapping(where, data)
    _only(where, d, ("type", "attributes", "stream", "toxicity"))
    if "type" not in d:
        raise ScenarioError(f"{where}.type: missing (one of timeout, latency, reset_peer, ...)")
    try:
        return Toxic(d["type"], _mapping(f"{where}.attributes", d.get("attributes")),
                     d.get("stream", "both"), d.get("toxicity", 1.0))
    except FaultError as exc:
        raise ScenarioError(f"{where}: {exc}") from None


def _step(index: int, data: Any) -> FaultStep:
    where = f"faults[{index}]"
    d = _mapping(where, data)
    action = d.get("action")
    if not isinstance(action, str) or action not in ACTIONS:
        raise ScenarioError(f"{where}.action {action!r}: expected one of {', '.join(ACTIONS)}")
    _only(where, d, ("at", "action", *ACTIONS[action]))
    at = _number(f"{where}.at", d.get("at", 0.0))
    kwargs: dict[str, Any] = {"at": float(at), "action": action}
    if action in ("toxic", "kill", "reboot", "replica_lag"):
        instance = d.get("instance", "reader" if action == "replica_lag" else "writer")
        if not isinstance(instance, str) or not instance:
            raise ScenarioError(f"{where}.instance: expected writer, reader, reader-N or an "
                                f"instance id, got {instance!r}")
        kwargs["instance"] = instance
    if action == "toxic":
        if "toxic" not in d:
            raise ScenarioError(f"{where}.toxic: missing (e.g. {{type: timeout}})")
        kwargs["toxic"] = _toxic(f"{where}.toxic", d["toxic"])
        kwargs["repeat"] = _number(f"{where}.repeat", d.get("repeat", 1), minimum=1,
                                   integer=True)
        if kwargs["repeat"] > 1:
            if d.get("every") is None or d.get("duration") is None:
                raise ScenarioError(f"{where}: repeat needs duration and every")
            kwargs["every"] = _number(f"{where}.every", d["every"])
            if kwargs["every"] <= d["duration"]:
                raise ScenarioError(f"{where}.every must be longer than duration")
    if action in ("toxic", "replica_lag"):
        kwargs["duration"] = _number(f"{where}.duration", d.get("duration"), allow_none=True)
    if action == "failover":
        target = d.get("target")
        if target is not None and not isinstance(target, str):
            raise ScenarioError(f"{where}.target: expected reader, reader-N or an instance id")
        mode = d.get("mode", "graceful" if target else "crash")
        if mode not in ("crash", "graceful"):
            raise ScenarioError(f"{where}.mode {mode!r}: expected crash or graceful")
        kwargs.update(target=target, mode=mode)
    if action in ("replica_lag", "dns_staleness"):
        if "seconds" not in d:
            raise ScenarioError(f"{where}.seconds: missing")
        kwargs["seconds"] = float(_number(f"{where}.seconds", d["seconds"]))
    return FaultStep(**kwargs)


def _steady(data: Any) -> SteadyState:
    d = _mapping("steady_state", data)
    _only("steady_state", d, [f.name for f in dataclasses.fields(SteadyState)])
    ratio = _number("steady_state.success_ratio", d.get("success_ratio", 0.95))
    if ratio > 1:
        raise ScenarioError("steady_state.success_ratio: expected a fraction in [0, 1]")
    return SteadyState(
        float(ratio), float(_number("steady_state.window", d.get("window", 2.0))),
        _number("steady_state.max_downtime", d.get("max_downtime"), allow_none=True),
        _number("steady_state.max_recovery", d.get("max_recovery"), allow_none=True))


def from_dict(data: Mapping[str, Any]) -> Scenario:
    """A validated :class:`Scenario` from parsed YAML/JSON."""
    d = _mapping("scenario", data)
    _only("scenario", d, ("name", "description", "cluster", "workload", "duration", "faults",
                          "steady_state", "invariants", "allowed_errors"))
    name = d.get("name")
    if not isinstance(name, str) or not name:
        raise ScenarioError("name: missing (a short identifier such as writer-crash)")
    duration = float(_number("duration", d.get("duration", 8.0), minimum=1.0))
    faults_data = d.get("faults") or []
    if not isinstance(faults_data, list):
        raise ScenarioError("faults: expected a list of steps")
    faults = tuple(_step(i, step) for i, step in enumerate(faults_data))
    for i, step in enumerate(faults):
        if step.at >= duration:
            raise ScenarioError(f"faults[{i}].at={step.at:g} is not before the end of the run "
                                f"(duration {duration:g} s)")
    workload = _workload(d.get("workload"))
    for i, step in enumerate(faults):
        if step.action == "rotate_secret" and "aws_secrets_manager" not in [
                c.strip().rstrip("?") for c in workload.plugins.split(",")]:
            raise ScenarioError(f"faults[{i}]: rotate_secret needs the application to log in "
                                "with the secret: add aws_secrets_manager to workload.plugins")
    invariants = tuple(d.get("invariants") or INVARIANTS)
    for inv in invariants:
        if inv not in INVARIANTS:
            raise ScenarioError(f"invariants: unknown {inv!r}; known: {', '.join(INVARIANTS)}")
    allowed = d.get("allowed_errors") or []
    if not isinstance(allowed, list) or not all(isinstance(a, str) for a in allowed):
        raise ScenarioError("allowed_errors: expected a list of exception class names")
    return Scenario(name, str(d.get("description", "")), _cluster(d.get("cluster")),
                    workload, duration, faults, _steady(d.get("steady_state")),
                    invariants, tuple(allowed))


def _library_dir() -> Any:
    return resources.files("chaos") / "scenarios"


def library() -> dict[str, Scenario]:
    """The shipped scenarios by name (``chaos/scenarios/*.yaml``): ``default`` first, then
    in file name order."""
    found: dict[str, Scenario] = {}
    for entry in sorted(_library_dir().iterdir(),
                        key=lambda e: (e.name != "default.yaml", e.name)):
        if entry.name.endswith(".yaml"):
            scenario = _parse(entry.read_text(encoding="utf-8"), entry.name)
            found[scenario.name] = scenario
    return found


def _parse(text: str, origin: str) -> Scenario:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ScenarioError(f"{origin}: not valid YAML: {exc}") from None
    try:
        return from_dict(data)
    except ScenarioError as exc:
        raise ScenarioError(f"{origin}: {exc}") from None


def load(source: str | Path | Mapping[str, Any] | Scenario) -> Scenario:
    """A scenario from a library name, a YAML file path, a dict or a :class:`Scenario`."""
    if isinstance(source, Scenario):
        return source
    if isinstance(source, Mapping):
        return from_dict(source)
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ScenarioError(f"scenario file {str(path)!r} does not exist")
        return _parse(path.read_text(encoding="utf-8"), str(path))
    shipped = library()
    if str(source) in shipped:
        return shipped[str(source)]
    raise ScenarioError(f"unknown scenario {str(source)!r}: not a file and not in the library "
                        f"({', '.join(shipped)}); see `python -m chaos list`")
