"""Run a scenario: start the cluster, start the workload, play the fault timeline, stop,
check the invariants and the steady-state hypothesis, and return the report data.

    from chaos.runner import run
    result = run("writer-crash", flavour="mysql")
    assert result.verdict == "pass", result.summary()
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import resilient_db
from chaos.analysis import Window, analyse
from chaos.control import ClusterControl, ControlError, SimulatorControl, writer_spans
from chaos.faults import AppliedFault, FaultBackend, LocalFaultBackend, Toxic
from chaos.scenario import FaultStep, Scenario, load
from chaos.secrets import SecretAuth, needs_secret
from chaos.workload import Workload

__all__ = ["EXIT_CODES", "Progress", "RunResult", "run"]

LOGGER = logging.getLogger("chaos.runner")

#: Exit status of ``python -m chaos run`` per verdict.
EXIT_CODES: Mapping[str, int] = {"pass": 0, "invariant_violated": 1, "hypothesis_failed": 3,
                                 "error": 4}

#: Called about twice a second while the scenario runs: (elapsed s, total s, successful
#: writes, successful reads, failed requests, latest event text).
Progress = Callable[[float, float, int, int, int, str], None]


@dataclasses.dataclass
class RunResult:
    """The outcome of one run: ``data`` is the JSON report; ``paths`` the files written."""

    data: dict[str, Any]
    paths: dict[str, Path] = dataclasses.field(default_factory=dict)

    @property
    def verdict(self) -> str:
        return str(self.data["verdict"])

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def summary(self) -> str:
        from chaos.report import summary

        return summary(self.data)


class _Timeline:
    """Plays the fault steps, each on its own daemon thread at its time."""

    def __init__(self, control: ClusterControl, backend: FaultBackend | None, t0: float,
                 end: float, auth: SecretAuth | None = None) -> None:
        self.control, self.backend, self.t0, self.end = control, backend, t0, end
        self.auth = auth
        self.windows: list[Window] = []
        self.errors: list[str] = []
        self.last = ""
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._active: list[AppliedFault] = []

    def rel(self) -> float:
        return time.monotonic() - self.t0

    def start(self, steps: tuple[FaultStep, ...]) -> None:
        for index, step in enumerate(steps):
            thread = threading.Thread(target=self._play, args=(index, step), daemon=True,
                                      name=f"chaos-step-{index}")
            self._threads.append(thread)
            thread.start()

    def _wait_until(self, rel_time: float) -> bool:
        """Sleep until ``rel_time``; False if the run is stopping."""
        return not self._stop.wait(max(0.0, self.t0 + rel_time - time.monotonic()))

    def _play(self, index: int, step: FaultStep) -> None:
        if not self._wait_until(step.at):
            return
        label = step.describe()
        start = self.rel()
        try:
            self.last = f"{start:5.1f}s {label}"
            if step.action == "toxic":
                self._toxic(step)
            elif step.action == "failover":
                target = self.control.resolve(step.target) if step.target else None
                self.control.failover(target, step.mode)
            elif step.action == "kill":
                self.control.kill(self.control.resolve(step.instance or "writer"))
            elif step.action == "reboot":
                self.control.reboot(self.control.resolve(step.instance or "writer"))
            elif step.action == "replica_lag":
                instance = self.control.resolve(step.instance or "reader")
                self.control.set_replica_lag(instance, step.seconds or 0.0)
                if step.duration is not None and self._wait_until(step.at + step.duration):
                    self.control.set_replica_lag(instance, 0.0)
            elif step.action == "dns_staleness":
                self.control.set_dns_staleness(step.seconds or 0.0)
            elif step.action == "rotate_secret":
                if self.auth is None:
                    raise ControlError("rotate_secret: the workload does not log in with a "
                                       "secret (aws_secrets_manager)")
                self.auth.rotate()
            elif step.action == "bluegreen_switchover":
                switchover = getattr(self.control, "bluegreen_switchover", None)
                if switchover is None:
                    raise ControlError("bluegreen_switchover: only on the simulator")
                switchover()
        except Exception as exc:
            LOGGER.exception("fault step %d (%s) failed", index, label)
            with self._lock:
                self.errors.append(f"faults[{index}] {label}: {type(exc).__name__}: {exc}")
        if step.action == "toxic":
            return  # one window per application, recorded by _toxic
        end = self.end if step.action == "kill" else self.rel()
        with self._lock:
            self.windows.append(Window(label, round(start, 4), round(end, 4)))

    def _toxic(self, step: FaultStep) -> None:
        assert step.toxic is not None and self.backend is not None
        for n in range(step.repeat):
            if n and not self._wait_until(step.at + n * (step.every or 0.0)):
                return
            instance = self.control.resolve(step.instance or "writer")
            address, port = self.control.address(instance)
            applied = self.rel()
            fault = self.backend.apply(instance, address, port, step.toxic)
            with self._lock:
                self._active.append(fault)
            self.control.record("network_fault", instance, action="applied",
                                toxic=step.toxic.type, stream=step.toxic.stream,
                                address=address, port=port)
            label = f"{step.toxic.describe()} on {instance}"
            if step.duration is None:
                with self._lock:
                    self.windows.append(Window(label, round(applied, 4), round(self.end, 4)))
                return
            self._wait_until(step.at + n * (step.every or 0.0) + step.duration)
            self._heal(fault)
            with self._lock:
                self.windows.append(Window(label, round(applied, 4), round(self.rel(), 4)))

    def _heal(self, fault: AppliedFault) -> None:
        assert self.backend is not None
        with self._lock:
            if fault not in self._active:
                return
            self._active.remove(fault)
        self.backend.heal(fault)
        self.control.record("network_fault", fault.instance, action="healed",
                            toxic=fault.toxic.type, address=fault.address, port=fault.port)

    def stop(self, timeout: float) -> None:
        """Heal every fault still applied and wait for the steps (a control-plane action in
        progress finishes)."""
        self._stop.set()
        with self._lock:
            active = list(self._active)
        for fault in active:
            try:
                self._heal(fault)
            except Exception as exc:
                self.errors.append(f"healing {fault.toxic.type} on {fault.instance}: {exc}")
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                self.errors.append(f"{thread.name} still running {timeout:g} s after the end")


def _toxics(scenario: Scenario) -> list[Toxic]:
    return [s.toxic for s in scenario.faults if s.toxic is not None]


def make_fault_backend(name: str, scenario: Scenario,
                       control: ClusterControl | None = None) -> FaultBackend | None:
    """The fault backend for a scenario (``None`` when it has no network faults); checks
    up front that the backend can apply every toxic of the scenario. ``toxiproxy`` on a
    proxied simulated cluster (``control``) drives the cluster's own proxies; elsewhere the
    Toxiproxy at ``TOXIPROXY_URL`` (or a container)."""
    toxics = _toxics(scenario)
    if not toxics:
        return None
    if name == "local":
        backend = LocalFaultBackend()
        for toxic in toxics:
            reason = backend.supports(toxic)
            if reason is not None:
                backend.clear()
                from chaos.faults import UnsupportedToxicError

                raise UnsupportedToxicError(f"scenario {scenario.name}: {reason}")
        return backend
    if name == "toxiproxy":
        from chaos.toxiproxy import ToxiproxyBackend

        cluster = getattr(control, "cluster", None)
        if cluster is not None and getattr(cluster, "toxiproxy", None) is not None:
            return ToxiproxyBackend.for_cluster(cluster)
        return ToxiproxyBackend.from_environment()
    raise ValueError(f"fault backend {name!r}: expected local or toxiproxy")


def effective_plugins(spec: str) -> str:
    """``spec`` with optional codes (``efm?``: only if this resilient_db has it) resolved."""
    from resilient_db._plugin_registry import ALIASES, available

    have = set(available())
    codes = []
    for item in (c.strip() for c in spec.split(",")):
        code = item.rstrip("?")
        if code and (item == code or ALIASES.get(code, code) in have):
            codes.append(code)
    return ",".join(codes)


def _setup_table(control: ClusterControl, kwargs: dict[str, Any]) -> str:
    sql = control.sql()
    table = f"chaos_{secrets.token_hex(4)}"
    conn = resilient_db.connect(sql.target, plugins="", **{**kwargs, "autocommit": True})
    try:
        cur = conn.cursor()
        cur.execute(sql.create.replace("{t}", table))
        cur.close()
    finally:
        conn.close()
    return table


def _final_rows(control: ClusterControl, kwargs: dict[str, Any], table: str) -> dict[int, str]:
    sql = control.sql()
    endpoint = getattr(control, "final_endpoint", lambda: control.writer_endpoint)()
    final = {**kwargs, **control.connect_kwargs(endpoint), "autocommit": True}
    last: Exception | None = None
    for _ in range(50):
        try:
            conn = resilient_db.connect(sql.target, plugins="", **final)
            try:
                cur = conn.cursor()
                cur.execute(f"SELECT id, inst FROM {table}")
                return {int(r[0]): str(r[1]) for r in cur.fetchall()}
            finally:
                conn.close()
        except Exception as exc:  # the writer may be finishing a restart
            last = exc
            time.sleep(0.2)
    raise ControlError(f"cannot read the final writer's rows: {last}") from last


def run(scenario: Scenario | str | Path | Mapping[str, Any], *, flavour: str | None = None,
        control: ClusterControl | None = None, faults: str = "local",
        simulator: str = "local", out_dir: Path | str | None = None,
        progress: Progress | None = None, write_reports: bool = True) -> RunResult:
    """Run ``scenario`` (a :class:`Scenario`, library name, YAML path or dict).

    ``flavour``: ``pg``, ``mysql`` or a flavour, overriding the scenario's. ``control``: a
    cluster to use (default: a simulated one started and stopped here; its monitors are shut
    down with ``resilient_db.shutdown()`` at the end). ``faults``: ``local`` or
    ``toxiproxy`` (on the simulator: the cluster is started proxied, every connection goes
    through its Toxiproxy-API proxies). ``out_dir``: where the JSON, HTML and PNG reports go
    (default ``chaos-reports/<scenario>-<engine>-<time>``); ``write_reports=False``: none."""
    scenario = load(scenario).with_flavour(flavour)
    if faults not in ("local", "toxiproxy"):
        raise ValueError(f"fault backend {faults!r}: expected local or toxiproxy")
    # The local backend is checked before a cluster is started for nothing.
    backend = make_fault_backend(faults, scenario) if faults == "local" else None
    owned = control is None
    started_wall = time.time()
    try:
        if control is None:
            control = SimulatorControl.start(scenario.cluster.flavour, scenario.cluster.readers,
                                             scenario.cluster.timeline, simulator,
                                             proxied=faults == "toxiproxy")
        if faults == "toxiproxy":
            backend = make_fault_backend(faults, scenario, control)
        data = _run(scenario, control, backend, progress, drop_table=not owned)
    finally:
        if backend is not None:
            with contextlib.suppress(Exception):
                backend.clear()
        if owned and control is not None:
            resilient_db.shutdown()
            control.close()
    data["started_at"] = datetime.datetime.fromtimestamp(
        started_wall, datetime.timezone.utc).isoformat(timespec="seconds")
    data["fault_backend"] = faults if backend is not None else "none"
    result = RunResult(data)
    if write_reports:
        from chaos.report import write_reports as write

        if out_dir is None:
            stamp = datetime.datetime.fromtimestamp(started_wall).strftime("%Y%m%d-%H%M%S")
            out_dir = Path("chaos-reports") / f"{scenario.name}-{data['engine']}-{stamp}"
        result.paths = write(data, Path(out_dir))
    return result


def _drop_table(control: ClusterControl, kwargs: dict[str, Any], table: str) -> None:
    """Remove the workload's table from a cluster that outlives the run (best effort)."""
    try:
        conn = resilient_db.connect(control.sql().target, plugins="",
                                    **{**kwargs, "autocommit": True})
        try:
            cur = conn.cursor()
            cur.execute(f"DROP TABLE {table}")
            cur.close()
        finally:
            conn.close()
    except Exception as exc:
        LOGGER.warning("could not drop the workload table %s: %s", table, exc)


def _run(scenario: Scenario, control: ClusterControl, backend: FaultBackend | None,
         progress: Progress | None, *, drop_table: bool = False) -> dict[str, Any]:
    sql = control.sql()
    spec = scenario.workload
    kwargs = {**control.connect_kwargs(), **sql.extra, "connect_timeout": 5,
              **dict(spec.properties)}
    table = _setup_table(control, kwargs)
    prepare = getattr(backend, "prepare", None)
    if prepare is not None and any(
            s.toxic is not None and s.toxic.type in ("latency", "bandwidth", "slicer",
                                                     "slow_close", "limit_data")
            for s in scenario.faults):
        # Proxy-served toxics hit only connections that go through the proxy: put it in
        # front of every instance before the application connects.
        for instance in getattr(control, "instance_ids", list)():
            prepare(*control.address(instance))
    plugins = effective_plugins(spec.plugins)
    auth = None
    if needs_secret(plugins, [s.action for s in scenario.faults]):
        auth = SecretAuth.setup(control, sql)
    try:
        return _play(scenario, control, backend, progress, kwargs, table, plugins, auth,
                     drop_table=drop_table)
    finally:
        if auth is not None:
            auth.close()


def _play(scenario: Scenario, control: ClusterControl, backend: FaultBackend | None,
          progress: Progress | None, kwargs: dict[str, Any], table: str, plugins: str,
          auth: SecretAuth | None, *, drop_table: bool) -> dict[str, Any]:
    sql = control.sql()
    spec = scenario.workload
    # The application logs in with the secret when there is one; the runner's own
    # connections (set-up, the final read) keep the cluster's user.
    app_kwargs = kwargs if auth is None else auth.workload_kwargs(kwargs)
    reader_kwargs = None
    if spec.reads == "reader":
        reader_kwargs = {**app_kwargs, **control.connect_kwargs(control.reader_endpoint)}
        if auth is not None:
            reader_kwargs = auth.workload_kwargs(reader_kwargs)
    workload = Workload(sql, table, app_kwargs, spec.threads, spec.write_ratio, spec.rate,
                        spec.tx_size, plugins, reader_kwargs, spec.reconnect_every,
                        split_reads=spec.reads == "split")
    workload.start()
    warm_deadline = time.monotonic() + 60
    while not workload.acked:
        if time.monotonic() > warm_deadline:
            workload.stop(5)
            raise ControlError("the workload made no write within 60 s of starting")
        time.sleep(0.02)
    t0 = time.monotonic()
    end = t0 + scenario.duration
    timeline = _Timeline(control, backend, t0, scenario.duration, auth)
    timeline.start(scenario.faults)
    while (now := time.monotonic()) < end:
        if progress is not None:
            ok_w, ok_r, failed = workload.snapshot()
            progress(now - t0, scenario.duration, ok_w, ok_r, failed, timeline.last)
        time.sleep(min(0.5, max(0.0, end - now)))
    t_end = time.monotonic()
    stuck = workload.stop(timeout=0.0)
    timeline.stop(timeout=120)
    stuck = workload.stop(timeout=30)
    if progress is not None:
        ok_w, ok_r, failed = workload.snapshot()
        progress(scenario.duration, scenario.duration, ok_w, ok_r, failed, "checking")
    control.settle(120)
    rows = _final_rows(control, kwargs, table)
    if drop_table:
        _drop_table(control, kwargs, table)
    events = control.events()
    spans = writer_spans(control.first_writer(), events)
    with workload._lock:
        requests = list(workload.requests)
        acked = dict(workload.acked)
        unresolved = set(workload.unresolved)
    result = analyse(
        requests=requests, acked=acked, unresolved=unresolved, rows=rows, spans=spans,
        events=events, windows=timeline.windows, t0=t0, t_end=t_end,
        invariants=scenario.invariants, allowed_errors=scenario.allowed_errors,
        success_ratio=scenario.steady_state.success_ratio, window=scenario.steady_state.window,
        max_downtime=scenario.steady_state.max_downtime,
        max_recovery=scenario.steady_state.max_recovery)
    errors = list(timeline.errors) + [f"{name} stuck in a request at the end" for name in stuck]
    if errors:
        result["hypothesis"].append({"name": "timeline", "ok": False, "detail": "; ".join(errors)})
    if not all(c["ok"] for c in result["invariants"]):
        verdict = "invariant_violated"
    elif timeline.errors:
        verdict = "error"
    elif not all(c["ok"] for c in result["hypothesis"]):
        verdict = "hypothesis_failed"
    else:
        verdict = "pass"
    rel_events = [{**e, "t": round(float(e["mono"]) - t0, 4)} for e in events
                  if float(e["mono"]) >= t0 - 1.0 and e["name"] not in ("cluster_started",
                                                                         "instance_started")]
    return {
        "format": "resilient_db.chaos/1",
        "scenario": scenario.to_json(),
        "engine": control.engine,
        "flavour": scenario.cluster.flavour,
        "cluster": control.description,
        "plugins": plugins,
        "table": table,
        "duration": round(t_end - t0, 4),
        "verdict": verdict,
        "windows": [dataclasses.asdict(w) for w in sorted(timeline.windows,
                                                           key=lambda w: w.start)],
        "events": rel_events,
        "writer_history": [{"instance": s.instance,
                            "from": None if s.start == float("-inf") else round(s.start - t0, 4),
                            "to": None if s.end == float("inf") else round(s.end - t0, 4)}
                           for s in spans],
        **result,
    }
