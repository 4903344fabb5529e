"""The ``tally`` command line."""

from __future__ import annotations

import argparse
import os
import sys

from tally.actors.affinity import MODES
from tally.actors.logs import ray_output_env, stderr_is_terminal
from tally.bench.run import BenchConfig
from tally.cluster.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tally", description="Analytics counters on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the whole service",
        description="Run tally: shard actors, the gateway, checkpoints. Each flag can also "
        "be set as a TALLY_* variable (TALLY_HTTP_PORT) or in a TOML file (--config).",
    )
    serve.add_argument("--config", help="TOML file with settings (also TALLY_CONFIG)")
    serve.add_argument("--store", help="sqlite:///path (default sqlite:///tally-data/tally.db), "
                       "mongodb://..., or memory:// (tests only)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--http-port", type=int, help="HTTP API port (default 8780)")
    serve.add_argument("--tcp-port", type=int, help="wire protocol port (default 8781)")
    serve.add_argument("--shards", type=int, help="number of shard actors (default 2 x CPUs)")
    serve.add_argument("--checkpoint-interval", type=float,
                       help="seconds between checkpoints (default 2)")
    serve.add_argument("--address", help="Ray address to join (auto on a ray up cluster)")
    serve.add_argument("--max-dirty-slots", type=int,
                       help="per shard, slots not yet checkpointed before ingest answers "
                       "overloaded (default 2000000)")
    serve.add_argument("--tokens", metavar="FILE",
                       help="TOML access list ([[token]] secret, tenants, scopes); required "
                       "to listen on a non-loopback --host")
    serve.add_argument("--rules", metavar="FILE",
                       help="TOML event fan-out rules ([[rule]] event, metric, tags, value, "
                       "bucket); replaces the built-in customer-service rules unless it says "
                       "builtin = true (default: the built-in rules)")
    serve.add_argument("--max-connections", type=int,
                       help="TCP connections at once, and HTTP connections (default 1000)")
    serve.add_argument("--frame-timeout", type=float,
                       help="seconds a client may take to send one frame or read its "
                       "answers before it is disconnected (default 30)")
    serve.add_argument("--max-query-days", type=int,
                       help="longest from..to range of a query, in days (default 3660)")
    serve.add_argument("--gateways-per-node", type=int,
                       help="gateway processes on every node, sharing its HTTP and TCP ports "
                       "(SO_REUSEPORT: the kernel spreads connections over them); one core "
                       "each (default 1)")
    serve.add_argument("--http-gateways-per-node", type=int,
                       help="more gateway processes on every node that take the HTTP port "
                       "alone (queries, HTTP ingest, the dashboard, /metrics), so that no "
                       "query waits while a gateway decodes TCP frames; the "
                       "--gateways-per-node ones then take TCP and StatsD only (default 0: "
                       "every gateway takes both)")
    serve.add_argument("--cpu-affinity", choices=MODES,
                       help="gateways: each TCP gateway process gets a core of its own and "
                       "the shards share the others, on every node with a core to spare "
                       "(default off: the kernel places them)")
    serve.add_argument("--statsd-port", type=int,
                       help="accept the StatsD/DogStatsD line protocol over UDP and TCP on "
                       "this port (default: off); at most once, like StatsD")
    serve.add_argument("--statsd-host",
                       help="address the StatsD listeners bind to (default: --host); StatsD "
                       "carries no token, so beyond loopback it must be named here")
    serve.add_argument("--statsd-tenant",
                       help="tenant of StatsD lines without a tenant tag (default: none, such "
                       "lines are refused)")
    serve.add_argument("--log-summary-interval", type=float,
                       help="seconds between the summary lines in the log (default 60; 0: "
                       "none)")
    bench = sub.add_parser(
        "bench",
        help="measure ingest, queries and memory against a service of its own",
        description="Start a tally serve on free ports with a temporary store and measure "
        "a matrix of cells (active series x how far back timestamps reach), columnar and "
        "row frames in each, checking each cell's total exactly; then query latency while "
        "the hardest cell ingests, and memory per series-month. The worst cell is the "
        "headline.",
    )
    defaults = BenchConfig()
    bench.add_argument("--store", help="store URL (default: SQLite in a temporary folder)")
    bench.add_argument("--series", default=defaults.series,
                       help=f"the matrix's active series, comma-separated (default "
                       f"{defaults.series})")
    bench.add_argument("--windows", default=defaults.windows,
                       help=f"how far back timestamps reach: hour (the current one), 24h, 30d "
                       f"(default {defaults.windows})")
    bench.add_argument("--million", action="store_true",
                       help="also the 1,000,000-series cells")
    bench.add_argument("--peer", choices=["clickhouse"],
                       help="send the same batches into ClickHouse (chDB, in-process) and ask "
                       "it the same questions; needs pip install 'tally[bench]'")
    for name in ("shards", "rows", "rows_per_frame", "columnar", "columnar_per_frame",
                 "distinct_frames", "connections", "queries", "breakdown_series",
                 "memory_series", "memory_hours", "gateways_per_node",
                 "http_gateways_per_node"):
        bench.add_argument(f"--{name.replace('_', '-')}", type=int,
                           default=getattr(defaults, name),
                           help=f"(default {getattr(defaults, name):,})")
    bench.add_argument("--cpu-affinity", choices=MODES, default=defaults.cpu_affinity,
                       help=f"tally serve's --cpu-affinity (default {defaults.cpu_affinity})")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bstatsd = sub.add_parser(
        "bench-statsd",
        help="StatsD lines/s accepted over UDP with zero loss, beside Etsy's statsd",
        description="Ramp a paced UDP send of StatsD counter lines at a tally serve of its "
        "own (--statsd-port, SQLite in a temporary folder; totals read back through "
        "/v1/series) until lines go missing, and report the highest rate with zero loss; "
        "the same ramp against Etsy's statsd (npm install statsd into a temporary folder) "
        "when npm is available, step for step in turn with tally's, with the ratio.",
    )
    bstatsd.add_argument("--duration", type=float, default=2.0,
                         help="seconds per step of the ramp (default 2)")
    bstatsd.add_argument("--lines-per-datagram", type=int, default=10,
                         help="StatsD lines packed in one datagram (default 10)")
    bstatsd.add_argument("--max-rate", type=int, default=1_600_000,
                         help="highest lines/s to try (default 1,600,000)")
    bstatsd.add_argument("--min-rate", type=int, default=0,
                         help="lowest lines/s to try (default: the ramp's first step)")
    bstatsd.add_argument("--shards", type=int, default=2,
                         help="tally serve --shards (default 2)")
    bstatsd.add_argument("--listener", action="store_true",
                         help="measure the StatsD listener alone (its own process, "
                         "in-process shards over SQLite, no Ray) instead of tally serve")
    bstatsd.add_argument("--no-etsy", dest="etsy", action="store_false",
                         help="do not measure Etsy's statsd")
    bstatsd.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    add_client_commands(sub)
    return parser


def _connection_flags(p: argparse.ArgumentParser, *, tcp: bool, http: bool) -> None:
    """Where a client command finds the service; the token also comes from TALLY_TOKEN."""
    if tcp or http:
        p.add_argument("--host", default="127.0.0.1", help="the service's address "
                       "(default 127.0.0.1)")
    if tcp:
        p.add_argument("--tcp-port", type=int, default=8781,
                       help="its wire protocol port (default 8781)")
    if http:
        p.add_argument("--http-port", type=int, default=8780,
                       help="its HTTP port (default 8780)")
    p.add_argument("--token", default=os.environ.get("TALLY_TOKEN"),
                   help="access token, when the service has --tokens (default: $TALLY_TOKEN)")


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    """``demo``, ``import`` and ``query``: clients of a running service."""
    demo = sub.add_parser(
        "demo",
        help="fill a demo tenant with a year of realistic customer-service events",
        description="Send about a year of customer-service events (message.received, "
        "message.replied: weekday and office-hour peaks, growth, channels, sentiments, "
        "agents of different speeds, response times in every bucket) to a running tally "
        "through the wire protocol, wait until they are durable, and print what was sent "
        "and the dashboard URL. The same --seed gives the same events. Adds to what the "
        "tenant holds: run it once per tenant.",
    )
    _connection_flags(demo, tcp=True, http=True)
    demo.add_argument("--tenant", default="demo", help="tenant to fill (default demo)")
    demo.add_argument("--days", type=int, default=365, help="days of history up to now "
                      "(default 365; about 670 events a day)")
    demo.add_argument("--seed", type=int, default=1, help="random seed (default 1)")

    imp = sub.add_parser(
        "import",
        help="import a JSON lines or CSV file of events or increments, resumably",
        description="Stream a file of events or increments to a running tally with durable "
        "acks, showing progress. Bad lines are reported with their line number and "
        "skipped. An interrupted import resumes where the server says the file is durable "
        "when the same command is run again, and nothing is counted twice: each chunk of "
        "the file is one batch whose seq is its end offset, under a producer name derived "
        "from the file. JSON lines: increments {tenant, metric, ts, value (default 1), "
        "tags} or events {type, tenant, ts, ...fields}. CSV with a header: increments "
        "tenant,metric,ts[,value][,tags (a JSON object)][,tag.KEY...] or events "
        "type,tenant,ts,FIELD.... ts is Unix seconds or an ISO 8601 datetime (UTC unless "
        "it has an offset). Exits 1 when any row was not imported.",
    )
    imp.add_argument("file", help="the file to import")
    imp.add_argument("--format", choices=("jsonl", "csv"),
                     help="file format (default: by extension, .jsonl/.ndjson/.json or .csv)")
    imp.add_argument("--kind", choices=("auto", "events", "increments"), default="auto",
                     help="what the rows are (default auto: events have a type, increments "
                     "a metric)")
    imp.add_argument("--producer", help="producer name the server deduplicates under "
                     "(default: derived from the file's path, size and mtime, so that "
                     "running the same command again resumes)")
    imp.add_argument("--rules", metavar="FILE|none",
                     help="event rules to check each event against before sending, so that "
                     "a bad event is skipped rather than refusing its whole batch: the file "
                     "the service runs with (tally serve --rules), or none to leave every "
                     "check to the service (default: the built-in rules)")
    imp.add_argument("--timeout", type=float, default=60.0,
                     help="seconds to wait for the service, and for the final durable flush "
                     "(default 60)")
    _connection_flags(imp, tcp=True, http=False)

    query = sub.add_parser(
        "query",
        help="print a series (or a breakdown with --by) as a table",
        description="Ask GET /v1/series (or /v1/breakdown with --by) and print a table: one "
        "row per bucket with a sparkline, or one row per tag value with a bar, the total "
        "and, with --compare, the previous period and the change. Parameters are the API's "
        "and are passed through as given; an error of the API is printed with its code and "
        "message, and the exit status is 1.",
    )
    query.add_argument("--tenant", required=True, help="the tenant to read")
    query.add_argument("--metric", required=True, help="the metric (messages.received)")
    query.add_argument("--from", dest="from_", metavar="FROM",
                       help="first day YYYY-MM-DD or ISO datetime, in --tz (default: 29 days "
                       "before --to)")
    query.add_argument("--to", help="last day (inclusive) or ISO datetime (default: today)")
    query.add_argument("--granularity", help="hour, day (default), week or month")
    query.add_argument("--tz", help="IANA time zone (default UTC)")
    query.add_argument("--where", action="append", default=[], metavar="KEY:VALUE",
                       help="tag filter, repeatable: series whose tags include all of them")
    query.add_argument("--compare", help="previous_period or previous_year")
    query.add_argument("--by", metavar="TAG", help="a breakdown: totals per value of this tag")
    query.add_argument("--limit", type=int, help="groups in a breakdown (default 10)")
    query.add_argument("--json", action="store_true", help="print the API's JSON answer")
    query.add_argument("--url", default=os.environ.get("TALLY_URL", "http://127.0.0.1:8780"),
                       help="the HTTP API (default: $TALLY_URL or http://127.0.0.1:8780)")
    query.add_argument("--token", default=os.environ.get("TALLY_TOKEN"),
                       help="access token with the query scope (default: $TALLY_TOKEN)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
        try:
            cfg = load_config(flags, args.config, dict(os.environ))
            ray_output_env(os.environ, stderr_is_terminal())  # before Ray is imported
            from tally.cluster.boot import serve

            return serve(cfg)
        except ConfigError as e:
            print(f"tally: error: {e}", file=sys.stderr)
            return 2
    if args.command == "bench":
        return bench(args)
    if args.command == "bench-statsd":
        return bench_statsd(args)
    if args.command == "demo":
        return demo(args)
    if args.command == "import":
        return import_file(args)
    if args.command == "query":
        return query(args)
    return 2


def demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tally.client import TallyError
    from tally.cluster.demo import report, run_demo, sent_line

    try:
        result = run_demo(host=args.host, tcp_port=args.tcp_port, http_port=args.http_port,
                          token=args.token, tenant=args.tenant, days=args.days, seed=args.seed)
    except (TallyError, ValueError, OSError) as e:
        print(f"tally demo: error: {e}", file=sys.stderr)
        return 1
    console = Console()
    if result.warning:
        console.print(f"[yellow]warning:[/] {result.warning}", highlight=False)
    console.print(report(result))
    console.print(sent_line(result), highlight=False)
    console.print(f"dashboard: {result.url}", highlight=False)
    return 0


def import_file(args: argparse.Namespace) -> int:
    from rich.console import Console

    from tally.cluster.importer import (
        ImportFailed,
        ImportOptions,
        load_rules_option,
        run_import,
        summary,
    )

    try:
        opts = ImportOptions(
            path=args.file, format=args.format, kind=args.kind, producer=args.producer,
            host=args.host, tcp_port=args.tcp_port, token=args.token,
            rules=load_rules_option(args.rules), timeout=args.timeout,
        )
        result = run_import(opts)
    except ImportFailed as e:
        print(f"tally import: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tally import: interrupted; run the same command again to resume",
              file=sys.stderr)
        return 130
    Console().print(summary(result))
    if result.interrupted:
        return 130
    return 0 if result.complete and not result.rejected else 1


def query(args: argparse.Namespace) -> int:
    from tally.cluster.query import QueryArgs, run_query

    # The two routes take different parameters: refuse one that would be ignored.
    misplaced = (["--granularity", "--compare"] if args.by is not None else ["--limit"])
    given = [flag for flag in misplaced if getattr(args, flag[2:]) is not None]
    if given:
        route = "a breakdown (--by)" if args.by is not None else "a series (no --by)"
        print(f"tally query: error: {', '.join(given)} does not apply to {route}",
              file=sys.stderr)
        return 2
    qargs = QueryArgs(
        tenant=args.tenant, metric=args.metric, from_=args.from_, to=args.to,
        granularity=args.granularity, tz=args.tz, where=args.where, compare=args.compare,
        by=args.by, limit=args.limit, url=args.url, token=args.token,
    )
    return run_query(qargs, as_json=args.json)


def bench(args: argparse.Namespace) -> int:
    from tally.bench.report import report
    from tally.bench.run import run, to_json

    cfg = BenchConfig(**{k: v for k, v in vars(args).items()
                         if k in BenchConfig.__dataclass_fields__ and v is not None})
    if problems := cfg.problems():
        for problem in problems:
            print(f"tally bench: {problem}", file=sys.stderr)
        return 2
    results = run(cfg, say=lambda m: print(f"tally bench: {m}", flush=True))
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            f.write(to_json(results))
    return 0 if results.exact and not results.errors else 1


def bench_statsd(args: argparse.Namespace) -> int:
    from tally.bench.statsd import StatsdBenchConfig, report, run_statsd, to_json

    cfg = StatsdBenchConfig(duration=args.duration, lines_per_datagram=args.lines_per_datagram,
                            max_rate=args.max_rate, min_rate=args.min_rate, etsy=args.etsy,
                            shards=args.shards, listener=args.listener)
    results = run_statsd(cfg, say=lambda m: print(f"tally bench-statsd: {m}", flush=True))
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            f.write(to_json(results))
    return 0 if results.tally.best > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
