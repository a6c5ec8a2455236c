"""Serve a local Databricks workspace emulator in the foreground (until Ctrl+C / SIGTERM).

    python -m fruit_assets_dev.databricks_emulator --root ./data/databricks [--port 8765] \\
        [--token T | --token-env VAR] [--secret SCOPE/KEY=ENV_VAR ...] [--spark-master local[2]] \\
        [--env NAME=VALUE ...] [--no-dbfs-root] [--environments DIR | --local]

Secret values are read from environment variables (``--secret storage/access_key=AWS_ACCESS_KEY_ID``),
never from the command line. It prints the ``export DATABRICKS_HOST=... DATABRICKS_TOKEN=...`` lines for
another shell (the token only when it was generated here).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from fruit_assets_dev.databricks_emulator.server import DatabricksEmulator


def _parse_secret(spec: str, environ) -> tuple[str, str, str]:
    target, sep, variable = spec.partition("=")
    scope, slash, key = target.partition("/")
    if not (sep and slash and scope and key and variable):
        raise ValueError(f"--secret {spec!r}: expected SCOPE/KEY=ENV_VAR")
    if variable not in environ:
        raise ValueError(f"--secret {spec!r}: environment variable {variable} is not set")
    return scope, key, environ[variable]


def parse_args(argv: list[str] | None = None, environ=os.environ) -> tuple[argparse.Namespace, dict, str | None]:
    parser = argparse.ArgumentParser(prog="python -m fruit_assets_dev.databricks_emulator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="folder for DBFS (root/dbfs) and run logs (root/runs)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument("--token", help="the accepted bearer token (visible in ps: prefer --token-env)")
    tokens.add_argument("--token-env", metavar="VAR", help="read the accepted bearer token from this environment variable")
    parser.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="SCOPE/KEY=ENV_VAR",
        help="a secret for dbutils.secrets.get(SCOPE, KEY), its value read from ENV_VAR (repeatable)",
    )
    parser.add_argument("--spark-master", default="local[2]", help="Spark master of every task (default local[2])")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="extra environment variable for every task"
    )
    parser.add_argument(
        "--no-dbfs-root", action="store_true",
        help="emulate a workspace without DBFS root (as new accounts are): the DBFS API answers 403 PERMISSION_DENIED",
    )
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--environments", metavar="DIR",
        help="where to build and keep the emulated runtimes' Python environments (default: ROOT/environments)",
    )
    modes.add_argument(
        "--local", action="store_true",
        help="run every task in this Python and its libraries instead of the runtime its spark_version names",
    )
    parser.add_argument("--log-level", default="INFO", help="emulator log level (default INFO; DEBUG logs each request)")
    args = parser.parse_args(argv)

    try:
        secrets: dict[str, dict[str, str]] = {}
        for spec in args.secret:
            scope, key, value = _parse_secret(spec, environ)
            secrets.setdefault(scope, {})[key] = value
        token = args.token
        if args.token_env:
            if not environ.get(args.token_env):
                raise ValueError(f"--token-env {args.token_env}: the variable is not set")
            token = environ[args.token_env]
        for item in args.env:
            if "=" not in item:
                raise ValueError(f"--env {item!r}: expected NAME=VALUE")
    except ValueError as e:
        parser.error(str(e))
    return args, secrets, token


def main(argv: list[str] | None = None) -> int:
    args, secrets, token = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    env = dict(item.split("=", 1) for item in args.env)
    emulator = DatabricksEmulator(
        args.root, token=token, secrets=secrets, host=args.host, port=args.port, spark_master=args.spark_master, env=env,
        dbfs_root=not args.no_dbfs_root,
        environments=None if args.local else (args.environments or os.path.join(args.root, "environments")),
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with emulator:
        print(f"Databricks emulator on {emulator.url} (root {emulator.root}); Ctrl+C stops it.", flush=True)
        print(f"export DATABRICKS_HOST={emulator.url}")
        if token is None:
            print(f"export DATABRICKS_TOKEN={emulator.token}")
        else:
            print("export DATABRICKS_TOKEN=<the token you gave>")
        for scope, keys in sorted(secrets.items()):
            print(f"secret scope {scope}: keys {', '.join(sorted(keys))}")
        sys.stdout.flush()
        while not stop.wait(0.5):
            pass
        print("stopping: cancelling active runs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
