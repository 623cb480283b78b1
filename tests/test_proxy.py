"""The PEP 249 proxies against real servers: surface, rows, pipeline coverage, native extras."""

from __future__ import annotations

import warnings
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

import resilient_db
from resilient_db import Call, Op, Plugin
from resilient_db._pipeline import Handler

from .conftest import Backend

pytestmark = pytest.mark.real_server


class Recorder(Plugin):
    """Records the op and method of every pipelined call (intercepts every op)."""

    code = "recorder"
    intercepts = resilient_db.ALL_OPS

    def __init__(self, ctx: resilient_db.PluginContext) -> None:
        super().__init__(ctx)
        self.seen: list[tuple[Op, str]] = []

    def execute(self, call: Call, proceed: Handler) -> Any:
        self.seen.append((call.op, call.method))
        return proceed(call)


def _recorded(conn: resilient_db.ConnectionProxy) -> list[tuple[Op, str]]:
    recorder: Recorder = conn.resilient.plugin("recorder")
    return recorder.seen


def _fill(b: Backend, n: int = 5) -> str:
    table = b.table()
    conn = b.raw(autocommit=True)
    cur = conn.cursor()
    rows = [(i, f"v{i}") for i in range(n)]
    cur.executemany(f"INSERT INTO {table} (id, v) VALUES (%s, %s)", rows)
    cur.close()
    conn.close()
    return table


@pytest.mark.parametrize("plugins", ["", [Recorder]])
def test_pep249_surface(backend: Backend, plugins: Any) -> None:
    table = _fill(backend)
    with backend.connect(plugins=plugins) as conn:
        cur = conn.cursor()
        assert cur.connection is conn
        assert cur.arraysize == 1
        cur.arraysize = 2
        assert cur._cur.arraysize == 2  # set on the driver cursor
        cur.execute(f"SELECT id, v FROM {table} ORDER BY id")
        assert [d[0] for d in cur.description] == ["id", "v"]
        assert cur.fetchone() == (0, "v0")
        assert cur.fetchmany() == [(1, "v1"), (2, "v2")]
        assert cur.fetchall() == [(3, "v3"), (4, "v4")]
        cur.execute(f"SELECT id FROM {table} ORDER BY id")
        assert [r[0] for r in cur] == [0, 1, 2, 3, 4]
        cur.executemany(f"INSERT INTO {table} (id, v) VALUES (%s, %s)", [(10, "a"), (11, "b")])
        conn.rollback()
        cur.execute(f"SELECT count(*) FROM {table}")
        assert cur.fetchone()[0] == 5
        cur.execute(f"UPDATE {table} SET v = 'x' WHERE id < 2")
        assert cur.rowcount == 2
        conn.commit()
        cur.close()
    with backend.connect() as check:
        cur = check.cursor()
        cur.execute(f"SELECT count(*) FROM {table} WHERE v = 'x'")
        assert cur.fetchone()[0] == 2


def test_rows_are_exactly_the_drivers(backend: Backend) -> None:
    table = _fill(backend, 20)
    query = f"SELECT id, v, id * 2.5 FROM {table} ORDER BY id"
    raw = backend.raw()
    raw_cur = raw.cursor()
    raw_cur.execute(query)
    expected = raw_cur.fetchall()
    raw.close()
    for plugins in ("", [Recorder]):
        with backend.connect(plugins=plugins) as conn:
            cur = conn.cursor()
            cur.execute(query)
            got = cur.fetchall()
            assert got == expected
            assert [type(v) for v in got[3]] == [type(v) for v in expected[3]]


def test_psycopg_row_factory_passes_through(pg_backend: Backend) -> None:
    with pg_backend.connect(row_factory=dict_row, plugins=[Recorder]) as conn:
        assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}


def test_every_io_call_goes_through_the_pipeline_psycopg(pg_backend: Backend) -> None:
    table = pg_backend.table()
    conn = pg_backend.connect(plugins=[Recorder])
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchone()
    cur.execute("SELECT 1")
    cur.fetchmany(1)
    cur.execute("SELECT 1")
    cur.fetchall()
    cur.execute("SELECT generate_series(1, 3)")
    list(cur)
    cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(1, "a")])
    conn.commit()
    conn.rollback()
    conn.execute("SELECT 1").fetchone()
    with conn.transaction():
        conn.execute(f"INSERT INTO {table} VALUES (2, 'b')")
    with conn.pipeline():
        conn.execute("SELECT 1")
    with cur.copy(f"COPY {table} (id, v) FROM STDIN") as copy:
        copy.write_row((3, "c"))
    assert list(cur.stream("SELECT 1")) == [(1,)]
    cur.execute("SELECT 1; SELECT 2")
    cur.nextset()
    cur.execute("SELECT generate_series(1, 3)")
    cur.scroll(1)
    conn.rollback()
    conn.autocommit = True
    cur.close()
    conn.close()
    seen = _recorded(conn)
    ops = {op for op, _ in seen}
    assert ops == {Op.EXECUTE, Op.EXECUTEMANY, Op.FETCH, Op.COMMIT, Op.ROLLBACK,
                   Op.TRANSACTION, Op.PIPELINE, Op.COPY, Op.SESSION, Op.CLOSE, Op.CURSOR}
    methods = {m for _, m in seen}
    for method in ("Cursor.execute", "Cursor.fetchone", "Cursor.fetchmany", "Cursor.fetchall",
                   "Cursor.executemany", "Connection.commit", "Connection.rollback",
                   "Connection.execute", "Connection.transaction.__enter__",
                   "Connection.transaction.__exit__", "Connection.pipeline.__enter__",
                   "Cursor.copy.__enter__", "Cursor.copy.__exit__", "Cursor.stream",
                   "Cursor.nextset", "Cursor.scroll", "Connection.autocommit", "Cursor.close",
                   "Connection.close"):
        assert method in methods, method


def test_every_io_call_goes_through_the_pipeline_mysql(mysql_backend: Backend) -> None:
    table = mysql_backend.table()
    conn = mysql_backend.connect(plugins=[Recorder])
    setup = conn.cursor()
    setup.execute("DROP PROCEDURE IF EXISTS rdb_proc")
    setup.execute("CREATE PROCEDURE rdb_proc(IN x INT) BEGIN SELECT x + 1; END")
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchone()
    cur.callproc("rdb_proc", (41,))
    with warnings.catch_warnings():  # stored_results() is deprecated in favour of a property
        warnings.simplefilter("ignore", DeprecationWarning)
        assert [r.fetchall() for r in cur.stored_results()] == [[(42,)]]
    conn.start_transaction()
    cur.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    conn.commit()
    conn.cmd_query("SELECT 1")
    conn.get_rows()
    assert conn.is_connected()
    conn.ping()
    conn.autocommit = True
    conn.close()
    ops = {op for op, _ in _recorded(conn)}
    assert {Op.EXECUTE, Op.CALLPROC, Op.FETCH, Op.TRANSACTION, Op.COMMIT, Op.SESSION,
            Op.CLOSE, Op.CURSOR} <= ops
    methods = {m for _, m in _recorded(conn)}
    assert {"Cursor.callproc", "Connection.cmd_query", "Connection.start_transaction",
            "Connection.is_connected", "Connection.ping"} <= methods


def test_native_attributes_pass_through(backend: Backend) -> None:
    conn = backend.connect(plugins=[Recorder])
    if backend.name == "pg":
        assert conn.info.server_version >= 150000
        conn.prepare_threshold = None
        assert conn.resilient.raw.prepare_threshold is None
        assert isinstance(conn.adapters, psycopg.adapt.AdaptersMap)
    else:
        assert "MariaDB" in conn.server_info
        assert conn.server_port == backend.kwargs["port"]
    assert _recorded(conn) == []  # no I/O, no pipeline
    conn.close()


def test_unique_violation_keeps_its_driver_type(backend: Backend) -> None:
    table = _fill(backend, 1)
    conn = backend.connect(plugins="execute_time,dev", autocommit=True)
    cur = conn.cursor()
    with pytest.raises(backend.unique_violation) as info:
        cur.execute(f"INSERT INTO {table} VALUES (0, 'dup')")
    assert not isinstance(info.value, resilient_db.Error)
    if backend.name == "pg":
        assert type(info.value) is psycopg.errors.UniqueViolation
    else:
        assert getattr(info.value, "errno", None) == 1062
    cur.execute("SELECT 1")  # the connection is still usable
    assert cur.fetchone() == (1,)
    conn.close()


def test_session_state_is_recorded(backend: Backend) -> None:
    conn = backend.connect()
    conn.autocommit = True
    if backend.name == "pg":
        conn.read_only = True
        conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        assert conn.resilient.session_state == {
            "autocommit": True, "read_only": True,
            "isolation_level": psycopg.IsolationLevel.SERIALIZABLE}
        assert conn.resilient.raw.read_only is True
    else:
        conn.time_zone = "+01:00"
        assert conn.resilient.session_state == {"autocommit": True, "time_zone": "+01:00"}
        cur = conn.cursor()
        cur.execute("SELECT @@session.time_zone")
        assert cur.fetchone() == ("+01:00",)
    assert conn.autocommit is True
    conn.close()


def test_replace_raw_reapplies_session_state(backend: Backend) -> None:
    conn = backend.connect(plugins=[Recorder])
    conn.autocommit = True
    old = conn.resilient.raw
    new = backend.raw()
    conn.resilient.replace_raw(new, conn.resilient.host, "test")
    assert conn.resilient.raw is new
    assert new.autocommit is True
    old.close()
    cur = conn.cursor()
    cur.execute("SELECT 1")
    assert cur.fetchone() == (1,)
    conn.close()


def test_context_managers(backend: Backend) -> None:
    table = backend.table()
    with backend.connect() as conn, conn.cursor() as cur:
        cur.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        if backend.name == "mysql":
            conn.commit()  # mysql-connector's `with` closes without committing
    raw = conn.resilient.raw
    assert raw.closed if backend.name == "pg" else not raw.is_connected()
    with backend.connect() as check:
        cur = check.cursor()
        cur.execute(f"SELECT v FROM {table}")
        assert cur.fetchall() == [("a",)]


def test_repr_names_host_and_plugins(backend: Backend) -> None:
    conn = backend.connect(plugins="execute_time")
    assert "execute_time" in repr(conn)
    assert backend.kwargs["host"] in repr(conn)
    conn.close()


class Reentrant(Plugin):
    """Runs another statement on the application's own cursor from inside its hook."""

    code = "reentrant"
    intercepts = frozenset({Op.EXECUTE})
    cursor: Any = None

    def execute(self, call: Call, proceed: Handler) -> Any:
        if call.args[0] == "SELECT 1" and Reentrant.cursor is not None:
            inner = Reentrant.cursor
            Reentrant.cursor = None
            inner.execute("SELECT 2")
            assert inner.fetchone() == (2,)
        return proceed(call)


def test_reentrant_statement_gets_its_own_call(backend: Backend) -> None:
    conn = backend.connect(plugins=[Reentrant])
    cur = conn.cursor()
    Reentrant.cursor = cur
    cur.execute("SELECT 1")
    assert cur.fetchone() == (1,)  # the outer call kept its own statement
    conn.close()


def test_statements_read_no_proxy_attribute(backend: Backend,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-statement path (cursor execute and fetch, failover's and efm's stages) reads
    nothing from the connection proxy, whose ``__getattr__`` pass-through keeps CPython from
    specializing reads (several times the cost of a plain read: once the largest share of the
    wrapper's cost, DESIGN §1); and the cursor proxy has no ``__getattr__`` at all (its driver
    attributes pass through generated properties), so reads on it specialize."""
    from resilient_db._proxy import ConnectionProxy

    conn = backend.connect(plugins="failover,efm")
    cur = conn.cursor()
    assert not any("__getattr__" in vars(k) for k in type(cur).__mro__)
    assert type(cur).__getattribute__ is object.__getattribute__
    cur.execute("SELECT 1")  # first statement: attaches efm
    assert cur.fetchone() == (1,)
    reads: list[str] = []

    def counting(self: Any, name: str) -> Any:
        if name.startswith("_") and not name.startswith("__"):
            reads.append(name)
        return object.__getattribute__(self, name)

    monkeypatch.setattr(ConnectionProxy, "__getattribute__", counting)
    for _ in range(5):
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    monkeypatch.undo()
    assert reads == []
    conn.close()


def test_statement_shortcut_is_the_outermost_layers_and_keeps_errors(backend: Backend) -> None:
    """failover fused with efm offers the execute chain a shortcut for ``execute(query,
    params)`` (no call object unless the statement fails); only while it is the outermost
    layer, never after close; errors through it are the driver's own and the connection
    stays usable."""
    conn = backend.connect(plugins="failover,efm")
    chains = conn._chains
    assert chains.statement is not None
    assert chains.statement is getattr(chains.execute, "statement", None)
    table = backend.table()
    cur = conn.cursor()
    cur.execute("SELECT 2")
    assert cur.fetchone() == (2,)
    cur.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    conn.commit()
    with pytest.raises(backend.unique_violation):  # the driver's own error, untouched
        cur.execute(f"INSERT INTO {table} VALUES (1, 'b')")
    conn.rollback()
    cur.execute("SELECT 3")
    assert cur.fetchone() == (3,)
    conn.close()
    assert chains.statement is None  # closed: straight to the closed driver connection
    wrapped = backend.connect(plugins="execute_time,failover,efm")
    assert wrapped._chains.statement is None  # an outer layer sees every statement
    wrapped.close()


def test_pass_through_properties_never_read_the_driver_cursors_instance_dict() -> None:
    """Reading a driver object's ``__dict__`` (``vars()``, ``dir()`` of the instance) makes
    CPython 3.11 stop specializing every attribute access of the driver's own code on it:
    it once cost mysql-connector 7 % more instructions per statement. The pass-through
    properties come from the driver cursor's class and the names the proxy class lists."""
    from resilient_db._proxy import CursorProxy, _pass_through_class

    class SpyCursor:
        def __init__(self) -> None:
            self.rowcount = -1

        def execute(self, query: str, params: Any = None) -> None:
            return None

        def scroll(self, value: int) -> None:
            return None

        @property
        def __dict__(self) -> dict[str, Any]:  # type: ignore[override]
            raise AssertionError("the driver cursor's __dict__ was read")

    made = _pass_through_class(CursorProxy, SpyCursor())
    assert issubclass(made, CursorProxy)
    assert isinstance(vars(made)["scroll"], property)
    assert isinstance(vars(made)["arraysize"], property)  # PEP 249's instance attribute
    assert _pass_through_class(CursorProxy, SpyCursor()) is made  # made once per class


@pytest.mark.parametrize("plugins", ["", [Recorder]])
def test_a_dropped_cursor_is_freed_at_once(backend: Backend, plugins: Any) -> None:
    """A cursor proxy is no reference cycle, whether or not a plugin intercepts fetches: an
    ORM opens one per statement and drops it, and its driver cursor must go with it, not at
    the garbage collector's next pass."""
    import gc
    import weakref

    with backend.connect(plugins=plugins) as conn:
        assert conn.resilient.pipeline.fetch_may_be_intercepted == bool(plugins)
        gc.disable()
        try:
            cur = conn.cursor()
            cur.execute("SELECT 1")
            assert cur.fetchone()[0] == 1
            proxy, driver_cursor = weakref.ref(cur), weakref.ref(cur._cur)
            del cur
            assert proxy() is None
            assert driver_cursor() is None
        finally:
            gc.enable()
        if plugins:
            assert (Op.FETCH, "Cursor.fetchone") in _recorded(conn)
