"""``python -m simulator``: start, inspect, break and stop simulated clusters from a shell.

    python -m simulator up aurora-pg --readers 2 --name db1
    python -m simulator status db1
    python -m simulator failover db1 --target instance-3
    python -m simulator events db1
    python -m simulator down db1

``up`` leaves a background daemon that owns the cluster (see :mod:`simulator.daemon`); every
other command talks to it over its control socket, with a deadline. Exit status: 0 ok,
2 bad input (unknown flavour, cluster or instance, bad arguments), 1 the action failed.
Reference with sample output: ``docs/simulator-cli.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from simulator import daemon
from simulator.cluster import FLAVOURS, Timeline
from simulator.daemon import (
    ActionFailedError,
    BadRequestError,
    DaemonUnreachableError,
    UnknownClusterError,
)

PROG = "python -m simulator"

#: Client deadline (seconds) for status, events, list and ping.
READ_TIMEOUT = 10.0
#: Client deadline for actions, on top of the cluster's own delays (failover, reboot).
ACTION_TIMEOUT = 120.0
#: Default deadline for `up` (the first start also builds server templates).
UP_TIMEOUT = 300.0
#: Deadline for a daemon to exit after `down` answered (or after SIGTERM).
EXIT_TIMEOUT = 30.0

_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9]{0,39}")


# --------------------------------------------------------------------------------------------
# Output


def _out(text: str = "") -> None:
    print(text, flush=True)


def _print_json(data: Any) -> None:
    _out(json.dumps(data, indent=2, default=str))


def _timestamp(wall: float) -> str:
    moment = datetime.datetime.fromtimestamp(wall, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def format_events(events: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per event: UTC time, seconds since the first event, name, instance,
    details."""
    if not events:
        return ["(no events)"]
    origin = float(events[0]["mono"])
    offsets = [f"+{float(e['mono']) - origin:.3f}s" for e in events]
    offset_width = max(map(len, offsets))
    name_width = max(len(str(e["name"])) for e in events)
    instance_width = max(len(str(e.get("instance") or "-")) for e in events)
    lines = []
    for event, offset in zip(events, offsets, strict=True):
        detail = " ".join(f"{key}={_detail_value(value)}"
                          for key, value in (event.get("detail") or {}).items())
        lines.append(
            f"{_timestamp(float(event['wall']))}  {offset:>{offset_width}}  "
            f"{event['name']!s:<{name_width}}  "
            f"{event.get('instance') or '-'!s:<{instance_width}}  {detail}".rstrip())
    return lines


def _detail_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _seconds_text(value: float | None) -> str:
    return "never" if value is None else f"{value:g} s"


def format_status(status: Mapping[str, Any]) -> list[str]:
    """The text form of a cluster's status (see ``status --json`` for every field)."""
    port = status.get("port")
    lines = [
        f"cluster    {status['name']}  ({status['flavour']}: {status.get('description', '')})",
        f"writer     {status['writer_endpoint']}:{port}",
        f"reader     {status['reader_endpoint']}:{port}",
        f"pattern    {status['host_pattern']}",
    ]
    connect = status.get("connect")
    if connect:
        login = {k: v for k, v in connect.items() if k not in ("host", "port")}
        lines.append("login      " + " ".join(f"{k}={v}" for k, v in login.items()))
    else:
        lines.append("login      (no writer right now)")
    superuser = status.get("superuser") or {}
    if superuser:
        lines.append(f"superuser  user={superuser.get('user')} "
                     f"password={superuser.get('password')} (per instance, by address)")
    timeline = status.get("timeline") or {}
    if timeline:
        lines.append(
            f"timeline   detection {_seconds_text(timeline.get('detection_delay'))}, "
            f"promotion {_seconds_text(timeline.get('promotion_delay'))}, "
            f"dns staleness {_seconds_text(timeline.get('dns_staleness'))}, "
            f"rejoin {_seconds_text(timeline.get('rejoin_delay'))}, "
            f"reboot {_seconds_text(timeline.get('reboot_downtime'))}")
    if status.get("toxiproxy_url"):
        lines.append(f"toxiproxy  {status['toxiproxy_url']} (one proxy per instance, named "
                     "after it; the names lead to the proxies)")
    iam = status.get("iam")
    if iam:
        lines.append(f"iam        users {', '.join(iam.get('users') or [])} log in with IAM "
                     f"auth tokens (region {iam.get('region')})")
    instances = status.get("instances") or []
    rows = [("ID", "ROLE", "ADDRESS", "LAG", "STATE", "ENDPOINT")]
    for instance in instances:
        address = f"{instance['address']}:{port}"
        if instance.get("proxy_address"):
            address = f"{instance['proxy_address']}:{port} -> {address}"
        rows.append((
            str(instance["id"]), str(instance["role"]), address,
            f"{float(instance.get('lag') or 0):g}",
            "running" if instance.get("running") else "down", str(instance["endpoint"]),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines.append("instances")
    lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
              .rstrip() for row in rows]
    owner = status.get("daemon") or {}
    if owner:
        lines.append(f"daemon     pid {owner.get('pid')}, log {owner.get('log')}")
    return lines


# --------------------------------------------------------------------------------------------
# Argument checking


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _seconds_or_never(text: str) -> float | None:
    return None if text == "never" else _seconds(text)


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected seconds > 0")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1024 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 1024-65535, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise BadRequestError(f"name {name!r}: expected 1-40 letters and digits, starting with "
                              f"a letter (it becomes part of DNS names)")
    return name


def _flavour_list() -> str:
    width = max(map(len, FLAVOURS))
    return "\n".join(f"  {name:<{width}}  {flavour.description}"
                     for name, flavour in FLAVOURS.items())


def _check_flavour(flavour: str, readers: int | None) -> None:
    known = FLAVOURS.get(flavour)
    if known is None:
        raise BadRequestError(f"unknown flavour {flavour!r}; valid flavours:\n{_flavour_list()}")
    if readers is not None and not known.min_readers <= readers <= known.max_readers:
        span = (str(known.min_readers) if known.min_readers == known.max_readers
                else f"{known.min_readers}-{known.max_readers}")
        raise BadRequestError(f"--readers {readers}: flavour {flavour!r} takes {span} readers")


# --------------------------------------------------------------------------------------------
# Commands


def _action_timeout(args: argparse.Namespace, name: str) -> float:
    if args.timeout is not None:
        return float(args.timeout)
    record = daemon.find(name)
    timeline = record.info.get("timeline") or {}
    delays = sum(float(timeline.get(key) or 0) for key in
                 ("detection_delay", "promotion_delay", "reboot_downtime"))
    return ACTION_TIMEOUT + delays


def _read_timeout(args: argparse.Namespace) -> float:
    return READ_TIMEOUT if args.timeout is None else float(args.timeout)


def _print_events(args: argparse.Namespace, reply: Mapping[str, Any]) -> None:
    events = reply.get("events") or []
    if args.json:
        _print_json({"events": events})
    else:
        for line in format_events(events):
            _out(line)


def cmd_up(args: argparse.Namespace) -> int:
    _check_flavour(args.flavour, args.readers)
    if args.name is not None:
        _check_name(args.name)
    timeline: dict[str, float | None] = {}
    for field in ("detection_delay", "promotion_delay", "dns_staleness", "reboot_downtime",
                  "switchover_phase", "green_metadata_lag"):
        value = getattr(args, field)
        if value is not None:
            timeline[field] = value
    if hasattr(args, "rejoin_delay"):
        timeline["rejoin_delay"] = args.rejoin_delay
    config = {"flavour": args.flavour, "readers": args.readers, "cluster_id": args.cluster_id,
              "port": args.port, "region": args.region, "aurora_like": args.aurora_like,
              "timeline": timeline, "proxied": args.proxied}
    daemon.timeline_from_config(config)  # bad combinations fail here, not in the daemon
    daemon.sweep()
    name, directory = _reserve(args.name, args.flavour)
    process = None
    try:
        process = daemon.spawn(directory, {**config, "name": name})
        daemon.wait_ready(directory, process, args.timeout or UP_TIMEOUT)
    except BaseException:
        if process is not None and process.poll() is None:
            daemon.terminate(process.pid, grace=EXIT_TIMEOUT)
        shutil.rmtree(directory, ignore_errors=True)
        raise
    reply = daemon.call(name, "status", timeout=READ_TIMEOUT)
    status = reply["result"]
    if args.json:
        _print_json(status)
    else:
        for line in format_status(status):
            _out(line)
    return 0


def _reserve(name: str | None, flavour: str) -> tuple[str, Path]:
    if name is not None:
        return name, daemon.reserve(name)
    stem = re.sub(r"[^a-z0-9]", "", flavour.lower())
    for number in range(1, 1000):
        candidate = f"{stem}{number}"
        if daemon.daemon_dir(candidate).exists():
            continue
        try:
            return candidate, daemon.reserve(candidate)
        except BadRequestError:
            continue  # taken by a concurrent `up` meanwhile
    raise ActionFailedError(f"no free default name {stem}<n>; pass --name")


def _default_name() -> str:
    live = [record.name for record in daemon.records() if record.is_alive()]
    if not live:
        raise UnknownClusterError("no cluster is running (start one with `up`)")
    if len(live) > 1:
        raise BadRequestError(f"several clusters are running ({', '.join(live)}); name one")
    return live[0]


def cmd_status(args: argparse.Namespace) -> int:
    name = args.name or _default_name()
    reply = daemon.call(name, "status", timeout=_read_timeout(args))
    if args.json:
        _print_json(reply["result"])
    else:
        for line in format_status(reply["result"]):
            _out(line)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    daemon.sweep()
    found = [record for record in daemon.records() if record.is_alive()]
    if args.json:
        # info["timeline"] is the timeline at start (for deadlines); `status` has today's.
        _print_json([{"name": r.name, "flavour": r.flavour, "state": r.state, "pid": r.pid,
                      "started": r.started,
                      **{k: v for k, v in r.info.items() if k != "timeline"}}
                     for r in found])
        return 0
    if not found:
        _out("no cluster is running")
        return 0
    rows = [("NAME", "FLAVOUR", "STATE", "PID", "PORT", "WRITER ENDPOINT")]
    rows += [(r.name, str(r.flavour), r.state, str(r.pid), str(r.info.get("port", "-")),
              str(r.info.get("writer_endpoint", "-"))) for r in found]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        _out("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _action(op: str, **fields: Callable[[argparse.Namespace], Any]) -> Callable[
        [argparse.Namespace], int]:
    """A command that sends ``op`` with ``fields`` taken from the arguments and prints the
    events it caused."""

    def command(args: argparse.Namespace) -> int:
        request = {key: pick(args) for key, pick in fields.items()}
        reply = daemon.call(args.name, op, timeout=_action_timeout(args, args.name),
                            **request)
        _print_events(args, reply)
        return 0

    return command


def cmd_events(args: argparse.Namespace) -> int:
    reply = daemon.call(args.name, "events", timeout=_read_timeout(args))
    _print_events(args, reply)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    if args.all == (args.name is not None):
        raise BadRequestError("down: name one cluster or pass --all")
    if args.all:
        daemon.sweep()
        names = [record.name for record in daemon.records() if record.is_alive()]
        if not names:
            _out("no cluster is running")
        worst = 0
        for name in names:
            if not args.json:
                _out(f"== {name}")
            try:
                _down_one(args, name)
            except (ActionFailedError, BadRequestError) as exc:
                print(f"{PROG}: error: {name}: {exc}", file=sys.stderr, flush=True)
                worst = 1
        return worst
    _down_one(args, args.name)
    return 0


def _down_one(args: argparse.Namespace, name: str) -> None:
    record = daemon.find(name)
    identity = record.identity
    answered = False
    if record.state == "ready":
        try:
            reply = daemon.call(name, "down", timeout=_action_timeout(args, name))
            answered = True
            _print_events(args, reply)
        except DaemonUnreachableError as exc:
            print(f"{PROG}: warning: {exc}; terminating the daemon", file=sys.stderr,
                  flush=True)
    if identity is not None:
        exited = answered and daemon.wait_gone(identity, EXIT_TIMEOUT)
        if not exited and not daemon.terminate(identity.pid, grace=EXIT_TIMEOUT):
            print(f"{PROG}: warning: daemon {identity.pid} had to be killed", file=sys.stderr,
                  flush=True)
    shutil.rmtree(record.directory, ignore_errors=True)
    daemon.sweep()  # what a killed daemon may have left (servers, names, addresses)
    if not args.json:
        _out(f"cluster {name} is down")


def cmd_daemon(args: argparse.Namespace) -> int:
    return daemon.serve(Path(args.directory))


# --------------------------------------------------------------------------------------------
# The parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON instead of text")
    common.add_argument("--timeout", type=_positive_seconds, metavar="S",
                        help="give up waiting for the daemon after S seconds")
    parser = argparse.ArgumentParser(
        prog=PROG, description="Simulated Aurora / RDS clusters on real local servers.",
        epilog="Exit status: 0 ok, 2 bad input, 1 the action failed. "
               "See docs/simulator-cli.md.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], int],
                help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help_text,
                                  description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    up = command("up", cmd_up, "start a cluster owned by a background daemon and print its "
                               "status")
    up.add_argument("flavour", metavar="FLAVOUR", help=f"one of: {', '.join(FLAVOURS)}")
    up.add_argument("--readers", type=_count, metavar="N",
                    help="number of readers (default: the flavour's)")
    up.add_argument("--name", help="cluster name, letters and digits (default: <flavour><n>)")
    up.add_argument("--cluster-id", help="the id in DNS names (default: random)")
    up.add_argument("--port", type=_port, help="port of every instance (default: the "
                                               "engine's, or any free one)")
    up.add_argument("--region", default="us-east-1", help="region in DNS names")
    up.add_argument("--proxied", action="store_true",
                    help="a Toxiproxy-API proxy in front of every instance; every name leads "
                         "to the proxies (status shows the API's URL)")
    up.add_argument("--aurora-like", action="store_true",
                    help="realistic delays (detection 10 s, DNS 15 s, ...) as defaults")
    defaults = Timeline()
    for field, help_text in (
            ("detection_delay", "writer failure to promotion"),
            ("promotion_delay", "extra time a promotion takes"),
            ("dns_staleness", "writer endpoint keeps the old address this long"),
            ("reboot_downtime", "a reboot keeps the instance down this long"),
            ("switchover_phase", "each blue/green switchover phase"),
            ("green_metadata_lag", "green's blue/green metadata trails blue's this long")):
        up.add_argument(f"--{field.replace('_', '-')}", type=_seconds, metavar="S",
                        help=f"{help_text} (default {getattr(defaults, field):g} s)")
    up.add_argument("--rejoin-delay", type=_seconds_or_never, metavar="S|never",
                    default=argparse.SUPPRESS,
                    help=f"old writer rejoins as a reader after S seconds (default "
                         f"{_seconds_text(defaults.rejoin_delay)})")

    status = command("status", cmd_status, "show endpoints, credentials and instances")
    status.add_argument("name", nargs="?", metavar="NAME",
                        help="cluster (default: the only one running)")
    command("list", cmd_list, "list running clusters (and sweep dead daemons' leftovers)")

    failover = command("failover", _action("failover", target=lambda a: a.target,
                                           mode=lambda a: a.mode), "fail the writer over")
    failover.add_argument("name", metavar="NAME")
    failover.add_argument("--target", metavar="ID", help="reader to promote (default: the "
                                                         "most advanced)")
    failover.add_argument("--mode", choices=("crash", "graceful"), default="crash",
                          help="crash: SIGKILL the writer; graceful: stop it cleanly first")

    read_only = command("read-only", _action(
        "read_only", read_only=lambda a: a.state == "on"),
        "turn the writer read-only under open connections, or back")
    read_only.add_argument("name", metavar="NAME")
    read_only.add_argument("state", choices=("on", "off"))

    for name, op, help_text in (
            ("kill", "kill", "SIGKILL an instance (no promotion)"),
            ("stop-instance", "stop_instance", "stop an instance cleanly"),
            ("start-instance", "start_instance", "start a stopped instance"),
            ("reboot", "reboot", "restart an instance in place"),
            ("remove-reader", "remove_reader", "remove a reader")):
        sub = command(name, _action(op, instance=lambda a: a.instance), help_text)
        sub.add_argument("name", metavar="NAME")
        sub.add_argument("instance", metavar="ID")

    add_reader = command("add-reader", _action("add_reader", instance=lambda a: a.id),
                         "add a reader")
    add_reader.add_argument("name", metavar="NAME")
    add_reader.add_argument("--id", metavar="ID", help="its id (default: the next free "
                                                       "instance-<n>)")

    lag = command("lag", _action("lag", instance=lambda a: a.instance,
                                 seconds=lambda a: a.seconds),
                  "delay applying changes on a reader")
    lag.add_argument("name", metavar="NAME")
    lag.add_argument("instance", metavar="ID")
    lag.add_argument("seconds", type=_seconds, metavar="SECONDS")

    staleness = command("dns-staleness", _action("dns_staleness", seconds=lambda a: a.seconds),
                        "from now on the writer endpoint lags SECONDS behind a promotion")
    staleness.add_argument("name", metavar="NAME")
    staleness.add_argument("seconds", type=_seconds, metavar="SECONDS")

    iam = command("enable-iam", _action("enable_iam", user=lambda a: a.user,
                                        region=lambda a: a.region),
                  "create a database user that logs in only with IAM auth tokens")
    iam.add_argument("name", metavar="NAME")
    iam.add_argument("--user", default="iam_user", help="the user (default iam_user)")
    iam.add_argument("--region", help="region the tokens must be signed for (default: the "
                                      "cluster's)")

    events = command("events", cmd_events, "every event of a cluster so far")
    events.add_argument("name", metavar="NAME")

    down = command("down", cmd_down, "stop a cluster (or all) and its daemon")
    down.add_argument("name", nargs="?", metavar="NAME")
    down.add_argument("--all", action="store_true", help="every running cluster")

    internal = commands.add_parser("_daemon")  # started by `up`; not for people
    internal.add_argument("directory")
    internal.set_defaults(handler=cmd_daemon)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except BadRequestError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except ActionFailedError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`... | head`): say nothing more, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
