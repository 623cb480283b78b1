"""``gdb_rw``: read/write splitting for an Aurora Global Database, kept to a home region.

``read_write_splitting`` (``conn.read_only = True`` moves the connection to a reader, ``False``
back to the writer; pools, session state, transactions alike) over the *global* topology that
the connection's failover plugin reads (``gdb_failover``, or ``failover``: with ``gdb_rw``
selected it reads the global topology too), with a home region (``gdb_rw_home_region``, else
the region of the endpoint connected to):

- readers: only the home region's (``gdb_rw_restrict_reader_to_home_region``, default true);
  with none there the connection stays where it is (``splitting.stayed``, reason
  ``no_reader``). False: readers of every region.
- the writer: the Global Database's writer, wherever the primary region is, unless
  ``gdb_rw_restrict_writer_to_home_region`` (default true) and it is in another region: then
  ``read_only = False`` raises ``ReadWriteSplittingError`` (reason ``writer_out_of_home``) and
  the connection stays where it is (a ``gdb_rw.writer_refused`` decision). A cached writer
  connection left outside the home region by a global switchover is not reused.

Writes always go to the one global writer: a secondary region's instances are read-only
(Global Write Forwarding, ``gdb_enable_global_write_forwarding``, is not supported).
"""

from __future__ import annotations

from .._params import GDB_RW_HOME_REGION, GDB_RW_RESTRICT_READER, GDB_RW_RESTRICT_WRITER
from .._pipeline import PluginContext
from ..errors import ConfigurationError
from ..global_db import home_region, splitting_readers, writer_refusal
from ..hosts import Host, Role, TopologySnapshot
from ._splitting import Slot
from .read_write_splitting import ReadWriteSplittingPlugin

__all__ = ["GdbReadWriteSplittingPlugin"]

_EXCLUSIVE = ("read_write_splitting", "srw")


class GdbReadWriteSplittingPlugin(ReadWriteSplittingPlugin):
    """See the module docstring. ``home``: the home region."""

    code = "gdb_rw"

    def __init__(self, ctx: PluginContext) -> None:
        clash = [code for code in _EXCLUSIVE if code in ctx.plugins]
        if clash:
            raise ConfigurationError(
                f"plugins: gdb_rw and {' and '.join(clash)} cannot serve the same connection "
                "(each moves it between instances); gdb_rw is read_write_splitting with a "
                "home region: keep one",
                parameter="plugins", value=",".join(sorted(ctx.plugins)))
        super().__init__(ctx)
        settings = ctx.settings
        self.home = home_region(settings[GDB_RW_HOME_REGION], ctx.host.host,
                                GDB_RW_HOME_REGION.name)
        self.restrict_writer: bool = settings[GDB_RW_RESTRICT_WRITER]
        self.restrict_reader: bool = settings[GDB_RW_RESTRICT_READER]

    def reader_candidates(self, snapshot: TopologySnapshot) -> list[Host]:
        readers = list(splitting_readers(snapshot, self.home, self.restrict_reader))
        left_out = len(snapshot.readers) - len(readers)
        if left_out:
            self.ctx.decide("gdb_rw.readers", self.code, **{
                "resilient_db.gdb.home_region": self.home,
                "resilient_db.gdb.readers": tuple(str(h) for h in readers),
                "resilient_db.gdb.left_out": left_out})
        return readers

    def writer_refusal(self, writer: Host) -> str | None:
        refusal = writer_refusal(writer, self.home, self.restrict_writer)
        if refusal is not None:
            self.ctx.decide("gdb_rw.writer_refused", self.code, **{
                "server.address": writer.host, "resilient_db.instance.id": writer.instance_id,
                "resilient_db.gdb.home_region": self.home,
                "resilient_db.gdb.primary_region": writer.region or ""})
        return refusal

    def still_valid(self, slot: Slot) -> str | None:
        reason = super().still_valid(slot)
        if reason is not None or slot.role is not Role.WRITER or not self.restrict_writer:
            return reason
        snapshot = self._monitor().snapshot
        listed = snapshot.by_instance(slot.instance_id) if (
            snapshot is not None and slot.instance_id) else None
        if listed is not None and listed.region not in (None, self.home):
            return "out_of_home"
        return None
