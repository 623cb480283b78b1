"""``python -m chaos``: run chaos scenarios and render their reports.

    python -m chaos list                                  # the scenario library
    python -m chaos run default                           # Aurora PostgreSQL, writer failover
    python -m chaos run writer-crash --flavour mysql      # another scenario, on MySQL
    python -m chaos run my-scenario.yaml --out reports/x  # your own scenario file
    python -m chaos run writer-crash --flavour pg,mysql   # several flavours, one after another
    python -m chaos run reset-storm --faults toxiproxy    # toxics on a proxied cluster's proxies
    python -m chaos report reports/x/report.json          # re-render HTML and PNG from JSON
    python -m chaos table reports/*/report.json           # a Markdown table of several runs
    python -m chaos run targeted-failover --flavour pg --rds-cluster my-aurora \
        --region eu-west-1 --db-user app --db-name app    # a real Aurora cluster (boto3);
                                                          # password in CHAOS_DB_PASSWORD

Exit status of ``run``: 0 every run passed, 1 an invariant was violated (an acknowledged
write lost, a write accepted by a reader, an undocumented error type), 3 the steady-state
hypothesis failed, 4 a fault step could not be carried out, 2 bad usage (unknown scenario,
malformed file, a toxic the fault backend cannot do). The worst outcome wins.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _list(names_only: bool) -> int:
    from chaos.scenario import library

    for name, scenario in library().items():
        if names_only:
            print(name)
            continue
        steps = "; ".join(step.describe() for step in scenario.faults) or "no faults"
        print(f"{name:<20} {steps}")
        print(f"{'':<20} {scenario.description}")
    return 0


def _run(args: argparse.Namespace) -> int:
    import resilient_db
    from chaos.control import ControlError
    from chaos.faults import FaultError
    from chaos.report import TerminalProgress
    from chaos.runner import EXIT_CODES, run
    from chaos.scenario import ScenarioError

    flavours: list[str | None] = [f.strip() for f in args.flavour.split(",")] \
        if args.flavour else [None]
    worst = 0
    for flavour in flavours:
        out = None
        if args.out:
            out = Path(args.out) / (flavour or "") if len(flavours) > 1 else Path(args.out)
        try:
            control = _rds_control(args, flavour)
            result = run(args.scenario, flavour=flavour, faults=args.faults,
                         simulator=args.simulator, out_dir=out, control=control,
                         progress=None if args.quiet else TerminalProgress())
        except (ScenarioError, FaultError, ControlError) as exc:
            print(f"chaos: {exc}", file=sys.stderr)
            return 2
        finally:
            resilient_db.shutdown()
        print(result.summary())
        print(f"  report: {result.paths['html']}")
        print(f"  json:   {result.paths['json']}")
        print(f"  plot:   {result.paths['png']}")
        code = EXIT_CODES[result.verdict]
        worst = code if worst == 0 or code == 1 else worst
    return worst


def _rds_control(args: argparse.Namespace, flavour: str | None) -> Any:
    """An RDS control for ``--rds-cluster`` (``None`` without it: the simulator)."""
    if not args.rds_cluster:
        return None
    import os

    from chaos.control import ControlError
    from chaos.rds import RdsControl

    engine = {"pg": "pg", "aurora-pg": "pg", "mysql": "mysql",
              "aurora-mysql": "mysql"}.get(flavour or "")
    if engine is None:
        raise ControlError("--rds-cluster needs --flavour pg or --flavour mysql (the engine "
                           "of the cluster)")
    password = os.environ.get("CHAOS_DB_PASSWORD")
    if not args.db_user or not args.db_name or password is None:
        raise ControlError("--rds-cluster needs --db-user, --db-name and the password in "
                           "the environment variable CHAOS_DB_PASSWORD")
    return RdsControl(args.rds_cluster, engine=engine, user=args.db_user, password=password,
                      database=args.db_name, region=args.region,
                      endpoint_url=args.endpoint_url)


def _report(args: argparse.Namespace) -> int:
    from chaos.report import summary, write_reports

    path = Path(args.json)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        print(f"chaos: cannot read {path}: {exc}", file=sys.stderr)
        return 2
    if data.get("format") != "resilient_db.chaos/1":
        print(f"chaos: {path} is not a chaos report (format resilient_db.chaos/1)",
              file=sys.stderr)
        return 2
    paths = write_reports(data, Path(args.out) if args.out else path.parent)
    print(summary(data))
    print(f"  report: {paths['html']}")
    print(f"  plot:   {paths['png']}")
    return 0


def _table(args: argparse.Namespace) -> int:
    from chaos.report import markdown_table

    reports = []
    for name in args.json:
        try:
            reports.append(json.loads(Path(name).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"chaos: cannot read {name}: {exc}", file=sys.stderr)
            return 2
    print(markdown_table(reports))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    list_p = sub.add_parser("list", help="list the scenario library")
    list_p.add_argument("--names", action="store_true", help="names only, one a line")
    run_p = sub.add_parser("run", help="run a scenario (library name or YAML file)")
    run_p.add_argument("scenario")
    run_p.add_argument("--flavour", help="pg, mysql, aurora-pg or aurora-mysql; several "
                                         "comma-separated (default: the scenario's)")
    run_p.add_argument("--faults", default="local", choices=("local", "toxiproxy"),
                       help="network fault backend (default: local iptables injector; "
                            "toxiproxy: the simulated cluster is started proxied and the "
                            "toxics go on its per-instance proxies)")
    run_p.add_argument("--simulator", default="local", choices=("local", "testcontainers"),
                       help="instance runtime of the simulated cluster")
    run_p.add_argument("--out", help="report directory (default: chaos-reports/<run>)")
    run_p.add_argument("-q", "--quiet", action="store_true", help="no live progress line")
    rds = run_p.add_argument_group("real Aurora/RDS cluster (boto3) instead of the simulator")
    rds.add_argument("--rds-cluster", help="DB cluster identifier")
    rds.add_argument("--region", help="AWS region (default: boto3's)")
    rds.add_argument("--endpoint-url", help="RDS API endpoint (e.g. a moto server)")
    rds.add_argument("--db-user", help="application user")
    rds.add_argument("--db-name", help="database name")
    rep = sub.add_parser("report", help="re-render the HTML and PNG of a JSON report")
    rep.add_argument("json")
    rep.add_argument("--out", help="directory for the HTML and PNG (default: beside the JSON)")
    table = sub.add_parser("table", help="a Markdown table of several JSON reports")
    table.add_argument("json", nargs="+")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(relativeCreated)7.0f %(name)s %(message)s")
    if not args.verbose:
        logging.getLogger("resilient_db.simulator").setLevel(logging.ERROR)
    if args.command == "list":
        return _list(args.names)
    if args.command == "run":
        return _run(args)
    if args.command == "table":
        return _table(args)
    return _report(args)


if __name__ == "__main__":
    sys.exit(main())
