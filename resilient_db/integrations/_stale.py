"""What the pool integrations share: telling a pooled connection opened before the cluster's
writer changed, and recording that the pool recycled it.

A pool keeps idle connections for a long time; after a failover those opened under the old
topology may still point at the demoted writer. Two mechanisms move them, never both:

- ``aurora_connection_tracker`` among the connection's plugins moves the connection itself,
  on its next statement (no transaction open: silently; else the transaction fails as
  "resolution unknown"). The pool leaves such connections alone.
- Otherwise the pool recycles them lazily: a connection whose ``failover`` plugin reports
  ``stale`` (the topology epoch moved on since it was opened, see
  ``FailoverPlugin.stale``) is closed at checkout (or return) and the pool opens a new one.

Used by the SQLAlchemy dialects' checkout hook and by the psycopg_pool integration.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["record_recycled", "untracked_failover"]


def untracked_failover(conn: Any) -> Any:
    """``conn``'s ``failover`` plugin when nothing else moves it after a writer change (no
    ``aurora_connection_tracker``); ``None`` otherwise, and for a connection that is not a
    resilient_db proxy. Its ``stale`` says whether the pool must recycle ``conn``."""
    view = getattr(conn, "resilient", None)
    if view is None or view.plugin("aurora_connection_tracker") is not None:
        return None
    return view.plugin("failover")


def record_recycled(kind: str, failover: Any, conn: Any, log: logging.Logger,
                    **attributes: Any) -> None:
    """Record decision ``kind`` (and an INFO log line) for a stale pooled connection that the
    pool discards; ``failover`` is its plugin (:func:`untracked_failover`)."""
    failover.ctx.decide(kind, None, **{
        "resilient_db.instance.id": failover.instance_id or "",
        "server.address": conn.resilient.host.host,
        **attributes,
    })
    log.info("recycling a pooled connection to instance %s: the writer changed since it "
             "was opened", failover.instance_id)
