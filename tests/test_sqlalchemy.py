"""The SQLAlchemy 2 dialects (resilient_db.integrations.sqlalchemy): entry points, the mapping of
resilient_db's outcomes to SQLAlchemy's disconnect handling, the read-only execution option,
and, on simulated Aurora PostgreSQL and Aurora MySQL clusters, ORM sessions through a writer
failover (mid-session and under load, nothing lost), driver errors that keep their identity,
pooled connections after a failover, and ``engine.dispose()`` releasing the monitors."""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import mysql.connector
import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import registry
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

import resilient_db
from resilient_db import efm_monitor, topology
from resilient_db.drivers import get_driver
from resilient_db.integrations import sqlalchemy as integration
from resilient_db.integrations.sqlalchemy import (
    ResilientMysqlConnectorDialect,
    ResilientPsycopgDialect,
)
from simulator.cluster import Cluster, Timeline
from simulator.local import LocalServer

from .clusters import SharedClusters, settle_roles
from .waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
SCHEMES: dict[str, Any] = {
    "postgresql.resilient_psycopg": ResilientPsycopgDialect,
    "mysql.resilient_mysqlconnector": ResilientMysqlConnectorDialect,
}
TIMELINE = Timeline(detection_delay=0.2, dns_staleness=0.0, rejoin_delay=0.3)


def _register_dialects() -> None:
    """The URL schemes come from the package's entry points once it is installed with them;
    in a checkout whose installed metadata predates them, register them by hand."""
    installed = {ep.name for ep in metadata.entry_points(group="sqlalchemy.dialects")}
    for name, cls in SCHEMES.items():
        if name not in installed:
            registry.register(name, cls.__module__, cls.__name__)


_register_dialects()


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "sqla_items"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    worker: Mapped[int]
    note: Mapped[str] = mapped_column(sa.String(50))


def dbapi(conn: sa.Connection) -> Any:
    """The DBAPI connection under a SQLAlchemy connection: a resilient_db proxy."""
    return conn.connection.dbapi_connection


# --- entry points and dialect hooks (no server) --------------------------------------------------


@pytest.mark.unit
def test_pyproject_declares_the_url_schemes() -> None:
    """The integrator's reinstall turns these into the entry points SQLAlchemy reads."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with (ROOT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    declared = project["entry-points"]["sqlalchemy.dialects"]
    assert set(declared) == set(SCHEMES)
    for name, target in declared.items():
        module, _, attr = target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        assert cls is SCHEMES[name]
        backend, _, driver = name.partition(".")
        assert (cls.name, cls.driver) == (backend, driver)  # what the URL says is what loads
    extras = project["optional-dependencies"]
    assert any(r.lower().startswith("sqlalchemy>=2") for r in extras["sqlalchemy"])
    assert "sqlalchemy" in extras["dev"][0] and "django" in extras["dev"][0]


@pytest.mark.unit
@pytest.mark.parametrize("url", ["postgresql+resilient_psycopg://u@h/d",
                                 "mysql+resilient_mysqlconnector://u@h/d"])
def test_url_scheme_loads_the_resilient_dialect(url: str) -> None:
    dialect: Any = sa.create_engine(url).dialect
    assert type(dialect) in SCHEMES.values()
    assert integration.READ_ONLY_OPTION in dialect.connection_characteristics
    if url.startswith("postgresql"):
        assert "postgresql_readonly" in dialect.connection_characteristics


def _outcome(driver_code: str, cls: type[resilient_db.Error], **fields: Any) -> Exception:
    return get_driver(driver_code).error(cls, "test outcome", **fields)


@pytest.mark.unit
@pytest.mark.parametrize(("url", "driver_code"), [
    ("postgresql+resilient_psycopg://u@h/d", "psycopg"),
    ("mysql+resilient_mysqlconnector://u@h/d", "mysql-connector")])
def test_is_disconnect_maps_resilient_outcomes(url: str, driver_code: str) -> None:
    dialect: Any = sa.create_engine(url).dialect  # errors of two drivers: not one DBAPI type
    fields = {"host": "b", "failed_host": "a", "statement_sent": True}
    assert not dialect.is_disconnect(
        _outcome(driver_code, resilient_db.FailoverSuccessError, **fields), None, None)
    assert not dialect.is_disconnect(
        _outcome(driver_code, resilient_db.TransactionResolutionUnknownError, **fields), None,
        None)
    assert dialect.is_disconnect(
        _outcome(driver_code, resilient_db.FailoverFailedError, attempts=(), **fields), None,
        None)
    assert dialect.is_disconnect(
        _outcome(driver_code, resilient_db.ForkedConnectionError, host="a", parent_pid=1),
        None, None)
    assert not dialect.is_disconnect(
        _outcome(driver_code, resilient_db.QueryTimeoutError, timeout=1.0, cancelled=True,
                 host="a"), None, None)
    # The driver's own errors still get the stock verdict.
    if driver_code == "mysql-connector":
        lost = mysql.connector.errors.OperationalError("Lost connection", errno=2013)
        assert dialect.is_disconnect(lost, None, None)
    else:
        assert not dialect.is_disconnect(psycopg.errors.UniqueViolation("dup"), None, None)


@pytest.mark.unit
def test_plugins_query_key_and_connect_args() -> None:
    assert integration._plugins_from_query({"resilient_db_plugins": "failover,efm"}) == {
        "plugins": "failover,efm"}
    assert integration._plugins_from_query({"resilient_db_plugins": ("failover", "efm")}) == {
        "plugins": "failover,efm"}
    assert integration._plugins_from_query({"resilient_db_plugins": "efm", "plugins": ""}) == {
        "plugins": ""}  # connect_args win over the URL
    assert integration._plugins_from_query({"host": "h"}) == {"host": "h"}


@pytest.mark.unit
def test_async_engine_is_resilient_on_postgresql_and_refused_on_mysql() -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine("postgresql+resilient_psycopg://u@h/d")
    assert isinstance(engine.dialect, integration.ResilientAsyncPsycopgDialect)
    with pytest.raises(resilient_db.ConfigurationError) as info:
        create_async_engine("mysql+resilient_mysqlconnector://u@h/d")
    assert info.value.parameter == "url"


# --- single servers: connect, read-only option, errors keep their identity ---------------------


def _server_url(server: LocalServer, scheme: str, **query: str) -> sa.URL:
    kw = server.connect_kwargs()
    return sa.URL.create(scheme, username=str(kw["user"]), password=str(kw["password"]),
                         host=str(kw["host"]), port=int(kw["port"]),
                         database=str(kw.get("dbname", kw.get("database"))), query=query)


@pytest.fixture(params=["pg", "mysql"])
def server_engine(request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    if request.param == "pg":
        url = _server_url(request.getfixturevalue("pg_server"), "postgresql+resilient_psycopg",
                          resilient_db_plugins="")
    else:
        url = _server_url(request.getfixturevalue("mysql_server"),
                          "mysql+resilient_mysqlconnector", resilient_db_plugins="",
                          use_pure="true")
    engine = sa.create_engine(url)
    yield engine
    engine.dispose()


@pytest.mark.real_server
def test_connections_are_resilient_db_proxies(server_engine: sa.Engine) -> None:
    with server_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
        proxy = dbapi(conn)
        assert isinstance(proxy, resilient_db.ConnectionProxy)
        assert proxy.resilient.plugins == ()  # resilient_db_plugins= from the URL


@pytest.mark.real_server
def test_read_only_option_sets_and_resets_the_dbapi_attribute(server_engine: sa.Engine) -> None:
    """The attribute read_write_splitting routes on; reset when the connection is returned."""
    with server_engine.connect() as conn:
        proxy = dbapi(conn)
        conn.execution_options(resilient_db_read_only=True)
        assert proxy.read_only is True
        if server_engine.dialect.name == "postgresql":  # psycopg applies it to transactions
            assert conn.execute(sa.text("SHOW transaction_read_only")).scalar() == "on"
            conn.rollback()
            assert proxy.resilient.session_state["read_only"] is True  # recorded, re-applied
    assert proxy.read_only is False
    if server_engine.dialect.name == "postgresql":
        with server_engine.connect().execution_options(postgresql_readonly=True) as conn:
            assert dbapi(conn).read_only is True
            assert conn.execute(sa.text("SHOW transaction_read_only")).scalar() == "on"


@pytest.mark.real_server
def test_integrity_error_keeps_its_identity(server_engine: sa.Engine) -> None:
    Base.metadata.drop_all(server_engine)
    Base.metadata.create_all(server_engine)
    with Session(server_engine) as session:
        session.add(Item(id=1, worker=0, note="a"))
        session.commit()
        session.add(Item(id=1, worker=0, note="b"))
        with pytest.raises(sa_exc.IntegrityError) as info:
            session.commit()
        expected = (psycopg.errors.UniqueViolation if server_engine.dialect.name == "postgresql"
                    else mysql.connector.errors.IntegrityError)
        assert type(info.value.orig) is expected
        assert not info.value.connection_invalidated
        session.rollback()
        assert session.scalar(sa.select(sa.func.count()).select_from(Item)) == 1
    Base.metadata.drop_all(server_engine)


# --- simulated clusters ------------------------------------------------------------------------


@dataclass
class Env:
    name: str  # "pg" | "mysql"
    cluster: Cluster
    scheme: str
    extra: dict[str, Any]
    instance_sql: str
    engines: list[sa.Engine] = field(default_factory=list)

    def engine(self, plugins: str | None = "failover", properties: dict[str, Any] | None = None,
               **kwargs: Any) -> sa.Engine:
        """An engine on the cluster (writer) endpoint; ``plugins=None``: the default list;
        ``properties``: more resilient_db properties (``connect_args``)."""
        kw = self.cluster.connect_kwargs()
        url = sa.URL.create(self.scheme, username=kw["user"], password=kw["password"],
                            host=kw["host"], port=int(kw["port"]),
                            database=kw.get("dbname", kw.get("database")))
        connect_args = {**self.extra, "connect_timeout": 5, **(properties or {})}
        if plugins is not None:
            connect_args["plugins"] = plugins
        engine = sa.create_engine(url, connect_args=connect_args, **kwargs)
        self.engines.append(engine)
        return engine

    def instance(self, conn: sa.Connection) -> str:
        return str(conn.execute(sa.text(self.instance_sql)).scalar())

    def count_on_writer(self) -> set[int]:
        """The ids stored, read on the current writer instance with the bare driver."""
        with self.cluster.superuser(self.cluster.writer.id) as conn:
            cur = conn.cursor()
            cur.execute(f"SELECT id FROM {Item.__tablename__}")
            return {int(row[0]) for row in cur.fetchall()}

    def dispose_engines(self) -> None:
        for engine in self.engines:
            with contextlib.suppress(Exception):
                engine.dispose()
        self.engines.clear()


@pytest.fixture(scope="module")
def clusters() -> Iterator[SharedClusters]:
    """One Aurora cluster per engine, started when a test first asks for it."""
    with SharedClusters(lambda engine: Cluster.start(engine, readers=1, timeline=TIMELINE),
                        settle_roles) as shared:
        yield shared


@pytest.fixture(params=["pg", "mysql"])
def env(request: pytest.FixtureRequest, clusters: SharedClusters) -> Iterator[Env]:
    """The engine's cluster, settled before and after the test (tests/clusters.py), with an
    empty items table."""
    shared = clusters.get(f"aurora-{request.param}")
    cluster = shared.acquire()
    if request.param == "pg":
        environment = Env("pg", cluster, "postgresql+resilient_psycopg", {},
                          "SELECT pg_catalog.aurora_db_instance_identifier()")
    else:
        environment = Env("mysql", cluster, "mysql+resilient_mysqlconnector",
                          {"use_pure": True, "aurora_mysql_lookalike_schema": "aurora_sim"},
                          "SELECT aurora_sim.aurora_server_id()")
    engine = environment.engine()
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    engine.dispose()
    yield environment
    environment.dispose_engines()
    shared.release()


def promoted(events: list[Any]) -> str:
    return str(next(e.instance for e in events if e.name == "promoted"))


def _retryable(error: sa_exc.DBAPIError) -> bool:
    """What an application retries after a failover: the connection works on the new writer."""
    return isinstance(error.orig, (resilient_db.FailoverSuccessError,
                                   resilient_db.TransactionResolutionUnknownError))


def commit_with_retry(engine: sa.Engine, make: Callable[[], list[Item]],
                      attempts: int = 5) -> None:
    """The retry loop an ORM application writes: roll back, run the whole transaction again.
    The rows have fixed primary keys, so a commit whose outcome was unknown and that did
    happen shows up as an IntegrityError on the retry, which means done."""
    for attempt in range(attempts):
        with Session(engine) as session:
            try:
                session.add_all(make())
                session.commit()
                return
            except sa_exc.IntegrityError:
                if attempt == 0:
                    raise  # not a retry: a real duplicate
                return
            except sa_exc.OperationalError as error:
                if not _retryable(error) or attempt == attempts - 1:
                    raise
                assert not error.connection_invalidated  # the connection is healthy
                session.rollback()
    raise AssertionError("unreachable")


@pytest.mark.real_server
def test_failover_mid_session_is_retried_with_nothing_lost(env: Env) -> None:
    engine = env.engine(pool_size=2)
    old = env.cluster.writer.id
    with Session(engine) as session:
        session.add(Item(id=1, worker=0, note="before"))
        session.commit()
        session.add(Item(id=2, worker=0, note="in the failed transaction"))
        session.flush()  # the transaction is open on the old writer
        new = promoted(env.cluster.failover())
        session.add(Item(id=3, worker=0, note="in the failed transaction"))
        with pytest.raises(sa_exc.OperationalError) as info:
            session.commit()
        assert isinstance(info.value.orig, resilient_db.TransactionResolutionUnknownError)
        assert isinstance(info.value.orig, psycopg.OperationalError if env.name == "pg"
                          else mysql.connector.errors.OperationalError)
        assert not info.value.connection_invalidated
        session.rollback()
        # The same session goes on, on the new writer: retry the lost transaction.
        session.add_all([Item(id=2, worker=0, note="retried"), Item(id=3, worker=0,
                                                                    note="retried")])
        session.commit()
        assert env.instance(session.connection()) == new != old
    assert env.count_on_writer() == {1, 2, 3}


@pytest.mark.real_server
def test_writer_failover_under_load_loses_nothing(env: Env) -> None:
    """Four threads, each its own ORM sessions on one pooled engine, commit rows while the
    writer crashes; every acknowledged commit is on the new writer afterwards."""
    engine = env.engine(plugins=None, pool_size=4)
    workers, per_worker = 4, 400
    acknowledged: list[set[int]] = [set() for _ in range(workers)]
    errors: list[BaseException] = []
    after_failover = threading.Event()
    started = threading.Barrier(workers + 1)

    def work(worker: int) -> None:
        try:
            started.wait(timeout=60)
            for seq in range(per_worker):
                key = worker * 100_000 + seq

                def make(key: int = key) -> list[Item]:
                    return [Item(id=key, worker=worker, note=f"w{worker}")]

                commit_with_retry(engine, make)
                acknowledged[worker].add(key)
                if after_failover.is_set() and seq >= per_worker // 2:
                    return
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in range(workers)]
    for thread in threads:
        thread.start()
    started.wait(timeout=60)
    wait_until("every worker committed a few rows",
               lambda: all(len(a) >= 5 for a in acknowledged) or bool(errors))
    before = env.cluster.writer.id
    new = promoted(env.cluster.failover())
    after_failover.set()
    mark = [len(a) for a in acknowledged]
    wait_until("every worker committed after the failover",
               lambda: all(len(a) > m + 5 for a, m in zip(acknowledged, mark, strict=True))
               or bool(errors) or not any(t.is_alive() for t in threads), timeout=120)
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert new != before
    stored = env.count_on_writer()
    wanted = set().union(*acknowledged)
    assert wanted <= stored, f"lost {sorted(wanted - stored)[:10]}"
    assert env.cluster.writer.id == new


@pytest.mark.real_server
@pytest.mark.parametrize("plugins", ["failover", None], ids=["checkout-hook", "tracker"])
def test_pooled_connections_never_write_to_the_demoted_writer(
        env: Env, plugins: str | None, sink: resilient_db.CollectingSink) -> None:
    """Connections resting in the pool when the writer changes: without
    aurora_connection_tracker the pool's checkout hook recycles them, with it (the default
    list) the tracker moves them; either way the application's writes go to the new writer
    and it sees no error."""
    # A short topology refresh: the monitor sees the new writer without a failing statement.
    engine = env.engine(plugins=plugins, pool_size=3, max_overflow=0,
                        properties={"topology_refresh_ms": 500})
    held = [engine.connect() for _ in range(3)]
    old = env.cluster.writer.id
    assert {env.instance(c) for c in held} == {old}
    failovers = [dbapi(c).resilient.plugin("failover") for c in held]
    for conn in held:
        conn.close()  # back to the pool, idle
    new = promoted(env.cluster.failover())
    wait_until("the topology monitor saw the new writer",
               lambda: all(f.stale for f in failovers), timeout=60)
    held = [engine.connect() for _ in range(3)]
    try:
        for n, conn in enumerate(held):
            conn.execute(sa.insert(Item).values(id=n, worker=0, note="after"))
            assert env.instance(conn) == new
            conn.commit()
    finally:
        for conn in held:
            conn.close()
    assert env.count_on_writer() == {0, 1, 2}
    recycled = [d for d in sink.decisions if d.kind == integration.POOL_RECYCLED]
    if plugins == "failover":  # the checkout hook did it
        assert len(recycled) == 3
        assert {d.attributes["resilient_db.instance.id"] for d in recycled} == {old}
    else:  # the tracker moved them (mysql-connector: failover did first, when cursor()
        # found the old connection dead, which the application does not see either)
        assert not recycled
        assert {"tracker.recycled", "failover.finished"} & set(sink.kinds())


def _monitor_sessions(env: Env) -> int:
    """resilient_db's monitoring sessions on every running instance (PostgreSQL names them)."""
    total = 0
    for instance in env.cluster.instances.values():
        if instance.role == "stopped":
            continue
        with env.cluster.superuser(instance.id) as conn:
            cur = conn.cursor()
            cur.execute("SELECT count(*) FROM pg_catalog.pg_stat_activity "
                        "WHERE application_name IN (%s, %s)",
                        (topology.MONITOR_APPLICATION_NAME, efm_monitor.PROBE_APPLICATION_NAME))
            total += int(cur.fetchone()[0])
    return total


@pytest.mark.real_server
def test_dispose_releases_monitors(env: Env) -> None:
    """After ``engine.dispose()`` no monitor thread or monitoring session serves the engine's
    connections: the topology monitor and efm's host monitors end ``monitor_disposal_time_ms``
    after their last connection."""
    # Host monitors are shared per host and keep the longest disposal time any user asked
    # for: start without those of earlier tests (default 60 s).
    resilient_db.shutdown()
    engine = env.engine(plugins="failover,efm", pool_size=3,
                        properties={"monitor_disposal_time_ms": 200,
                                    "topology_refresh_ms": 200})
    held = [engine.connect() for _ in range(3)]
    for conn in held:
        conn.execute(sa.text("SELECT 1"))  # efm attaches on a statement
    topo = dbapi(held[0]).resilient.plugin("failover").monitor()
    host_monitors = [m for m in efm_monitor.monitors() if m.running]
    assert host_monitors and topo.running
    for conn in held:
        conn.close()
    del held  # the test keeps no connection alive
    engine.dispose()
    wait_until("the topology monitor ended", lambda: not topo.running and
               not topo.connection_open, timeout=60)
    wait_until("the host monitors stopped",
               lambda: all(m.stopped and not m.running for m in host_monitors), timeout=60)
    names = [t.name for t in threading.enumerate()
             if t.name.startswith(("resilient_db-topology", "resilient_db-efm"))]
    assert not names, names
    if env.name == "pg":
        wait_until("no monitoring session left on the servers",
                   lambda: _monitor_sessions(env) == 0, timeout=60)


@pytest.mark.real_server
def test_read_only_option_routes_to_a_reader_through_read_write_splitting(env: Env) -> None:
    """``resilient_db_read_only`` (and PostgreSQL's own ``postgresql_readonly``) on a
    connection of an engine with ``read_write_splitting``: its statements run on a reader, the
    server refuses a write there, and the pooled connection is back on the writer after."""
    engine = env.engine(plugins="read_write_splitting,failover", pool_size=1, max_overflow=0)
    writer = env.cluster.writer.id
    readers = {i.id for i in env.cluster.readers}
    options = ["resilient_db_read_only"] + (["postgresql_readonly"] if env.name == "pg" else [])
    for option in options:
        with engine.connect() as conn:
            assert env.instance(conn) == writer
            conn.commit()
            routed = conn.execution_options(**{option: True})
            assert env.instance(routed) in readers
            with pytest.raises(sa_exc.DBAPIError):
                routed.execute(sa.text("CREATE TABLE never_on_a_reader (id int)"))
            routed.rollback()
        with engine.connect() as conn:  # the same pooled connection, reset
            assert env.instance(conn) == writer
    engine.dispose()
