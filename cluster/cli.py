"""The ``tally`` command line."""

from __future__ import annotations

import argparse
import os
import sys

from bench.run import BenchConfig
from cluster.config import ConfigError, load_config


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
    bench = sub.add_parser(
        "bench",
        help="measure ingest, queries and memory against a service of its own",
        description="Start a tally serve on free ports with a temporary store, measure "
        "ingest (row and columnar frames), query latency while ingesting, breakdown latency "
        "and memory, check every total, and print a table with ratios to baselines measured "
        "in the same run.",
    )
    defaults = BenchConfig()
    bench.add_argument("--store", help="store URL (default: SQLite in a temporary folder)")
    for name in ("shards", "series", "rows", "columnar", "connections", "queries",
                 "background_rate", "memory_series"):
        bench.add_argument(f"--{name.replace('_', '-')}", type=int,
                           default=getattr(defaults, name),
                           help=f"(default {getattr(defaults, name):,})")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        flags = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
        try:
            cfg = load_config(flags, args.config, dict(os.environ))
            # One structured line per checkpoint and error, never folded into
            # "repeated Nx": Ray reads this when it is imported.
            os.environ.setdefault("RAY_DEDUP_LOGS", "0")
            from cluster.boot import serve

            return serve(cfg)
        except ConfigError as e:
            print(f"tally: error: {e}", file=sys.stderr)
            return 2
    if args.command == "bench":
        return bench(args)
    return 2


def bench(args: argparse.Namespace) -> int:
    from bench.run import report, run, to_json

    cfg = BenchConfig(**{k: v for k, v in vars(args).items()
                         if k in BenchConfig.__dataclass_fields__ and v is not None})
    results = run(cfg, say=lambda m: print(f"tally bench: {m}", flush=True))
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            f.write(to_json(results))
    return 0 if results.exact and not results.errors else 1


if __name__ == "__main__":
    sys.exit(main())
