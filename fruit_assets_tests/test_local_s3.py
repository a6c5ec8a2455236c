"""Tests of fruit_assets_dev.local_s3 against real SeaweedFS servers (no mocks)."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from boto3.exceptions import S3UploadFailedError
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from fruit_assets_dev import local_s3
from fruit_assets_dev.local_s3 import LocalS3, find_weed, main, start_local_s3, upload_tree

pytestmark = pytest.mark.s3  # starts SeaweedFS servers

REPO_ROOT = Path(__file__).resolve().parents[1]
BUCKET = "fruit-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> LocalS3:
    server = start_local_s3(data_dir=tmp_path_factory.mktemp("s3"), die_with_parent=True)
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch) -> dict[str, str]:
    """The server's AWS_* settings in os.environ, nothing else AWS-related."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3.env()


def _port_free(port: int) -> bool:
    """Nothing listens there any more (a server could bind it; TIME_WAIT is fine)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _listening(pid: int) -> set[tuple[str, int]]:
    """(ip, port) of the TCP sockets process ``pid`` listens on, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A = LISTEN
                continue
            hexip, hexport = fields[1].split(":")
            ip = socket.inet_ntoa(bytes.fromhex(hexip)[::-1]) if len(hexip) == 8 else hexip
            found.add((ip, int(hexport, 16)))
    return found


def _error_code(exc_info) -> str:
    return exc_info.value.response["Error"]["Code"]


def test_find_weed_prefers_the_venv_binary():
    weed = find_weed()
    assert os.access(weed, os.X_OK)
    venv_weed = Path(sys.executable).parent / "weed"
    if venv_weed.exists():
        assert weed == str(venv_weed)


def test_server_put_get_and_idempotent_bucket(s3):
    assert s3.endpoint_url == f"http://127.0.0.1:{s3.port}"
    assert s3.is_running()
    s3.create_bucket(BUCKET)  # second time: no error
    client = s3.client()
    assert BUCKET in [b["Name"] for b in client.list_buckets()["Buckets"]]
    client.put_object(Bucket=BUCKET, Key="hello/world.txt", Body=b"hello fruit")
    assert client.get_object(Bucket=BUCKET, Key="hello/world.txt")["Body"].read() == b"hello fruit"


def test_env_and_secret_handling(s3):
    assert s3.env() == {
        "AWS_ENDPOINT_URL": s3.endpoint_url,
        "AWS_ACCESS_KEY_ID": "fruit",
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AWS_REGION": "eu-central-1",
        "AWS_DEFAULT_REGION": "eu-central-1",
    }
    assert len(s3.secret_key) >= 32  # generated
    assert s3.secret_key not in repr(s3)
    log_text = Path(s3.log_path).read_text(errors="replace")
    assert "Added admin identity" in log_text  # the server's output went to its log...
    assert s3.secret_key not in log_text  # ...without the secret
    assert Path(s3.log_path).parent == Path(s3.data_dir)


def test_listens_only_on_its_own_loopback_ports(s3):
    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc")
    listening = _listening(s3.pid)
    assert ("127.0.0.1", s3.port) in listening
    assert {ip for ip, _ in listening} == {"127.0.0.1"}
    assert {port for _, port in listening} <= set(s3.ports.values())
    # none of the weed defaults (S3, master, volume, filer, Iceberg, Lance, admin, WebDAV)
    assert not {port for _, port in listening} & {8333, 9333, 9340, 8888, 8181, 9101, 23646, 7333}


def test_wrong_credentials_are_rejected(s3):
    wrong_secret = local_s3._make_client(s3.endpoint_url, s3.access_key, "not-the-secret", s3.region)
    with pytest.raises(ClientError) as exc:
        wrong_secret.list_buckets()
    assert _error_code(exc) == "SignatureDoesNotMatch"

    wrong_key = local_s3._make_client(s3.endpoint_url, "nobody", s3.secret_key, s3.region)
    with pytest.raises(ClientError) as exc:
        wrong_key.list_objects_v2(Bucket=BUCKET)
    assert _error_code(exc) == "InvalidAccessKeyId"

    anonymous = boto3.client(
        "s3", endpoint_url=s3.endpoint_url, region_name=s3.region, config=Config(signature_version=UNSIGNED)
    )
    with pytest.raises(ClientError) as exc:
        anonymous.put_object(Bucket=BUCKET, Key="anon.txt", Body=b"x")
    assert _error_code(exc) == "AccessDenied"


def test_pyarrow_parquet_roundtrip_including_multipart(s3):
    fs = pafs.S3FileSystem(
        endpoint_override=f"127.0.0.1:{s3.port}",
        scheme="http",
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        region=s3.region,
    )
    small = pa.table({"fruit": ["apple", "banana", "cherry"], "n": [1, 2, 3]})
    pq.write_table(small, f"{BUCKET}/parquet/small.parquet", filesystem=fs)
    assert pq.read_table(f"{BUCKET}/parquet/small.parquet", filesystem=fs).equals(small)

    rows = 1_500_000  # random doubles do not compress: ~12 MB > pyarrow's multipart part size
    big = pa.table({"x": np.random.default_rng(0).random(rows), "i": np.arange(rows)})
    pq.write_table(big, f"{BUCKET}/parquet/big.parquet", filesystem=fs)
    assert fs.get_file_info(f"{BUCKET}/parquet/big.parquet").size > 10 * 1024 * 1024
    assert pq.read_table(f"{BUCKET}/parquet/big.parquet", filesystem=fs).equals(big)
    # and boto3 sees the same object
    head = s3.client().head_object(Bucket=BUCKET, Key="parquet/big.parquet")
    assert head["ContentLength"] > 10 * 1024 * 1024


def test_pyarrow_from_uri_and_endpoint_url_from_env(s3, s3_env):
    # pyarrow 26: FileSystem.from_uri("s3://...") honours AWS_ENDPOINT_URL (and the
    # keys/region from the environment); a bare S3FileSystem() does NOT use
    # AWS_ENDPOINT_URL, so pass endpoint_override (a full http:// URL works too).
    fs, path = pafs.FileSystem.from_uri(f"s3://{BUCKET}/from-uri/t.parquet")
    assert path == f"{BUCKET}/from-uri/t.parquet"
    table = pa.table({"a": [1, 2, 3]})
    pq.write_table(table, path, filesystem=fs)
    assert pq.read_table(path, filesystem=fs).equals(table)

    fs2 = pafs.S3FileSystem(endpoint_override=s3_env["AWS_ENDPOINT_URL"])  # keys and region from env
    assert pq.read_table(path, filesystem=fs2).equals(table)


def test_upload_tree_nested_folders_with_spaces(s3, s3_env, tmp_path, capsys):
    root = tmp_path / "photo tree"
    files = {
        "banana.png": b"banana bytes",
        "red apples/img 1.jpg": b"apple one",
        "red apples/sub dir/deep file.txt": b"deep",
        "big/blob.bin": os.urandom(9 * 1024 * 1024),  # > boto3's 8 MB multipart threshold
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "empty dir").mkdir()

    # client=None: boto3's default chain, endpoint from AWS_ENDPOINT_URL
    assert upload_tree(root, f"s3://{BUCKET}/uploads/run 1/") == len(files)
    client = s3.client()
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix="uploads/run 1/")["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(f"uploads/run 1/{rel}" for rel in files)
    for rel, data in files.items():
        assert client.get_object(Bucket=BUCKET, Key=f"uploads/run 1/{rel}")["Body"].read() == data

    # explicit client, bucket root
    s3.create_bucket("fruit-root")
    assert upload_tree(str(root / "red apples"), "s3://fruit-root", client=client) == 2
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="fruit-root")["Contents"]]
    assert sorted(keys) == ["img 1.jpg", "sub dir/deep file.txt"]

    # the CLI
    assert main(["upload", str(root / "red apples"), f"s3://{BUCKET}/cli"]) == 0
    assert capsys.readouterr().out.strip() == "2"
    assert client.head_object(Bucket=BUCKET, Key="cli/sub dir/deep file.txt")["ContentLength"] == 4

    # no bucket auto-creation (-s3.autoCreateBucket=false), as on AWS
    with pytest.raises(S3UploadFailedError, match="NoSuchBucket"):
        upload_tree(root, "s3://no-such-bucket/x", client=client)
    assert main(["upload", str(root), "s3://no-such-bucket/x"]) == 1
    assert "NoSuchBucket" in capsys.readouterr().err

    with pytest.raises(NotADirectoryError):
        upload_tree(root / "missing", f"s3://{BUCKET}/x")
    with pytest.raises(ValueError):
        upload_tree(root, "/not/s3")


def test_two_more_servers_at_once(s3, tmp_path):
    # Started concurrently from worker threads (so no die_with_parent), while the
    # module's server runs too: three servers, no port collisions.
    dirs = [tmp_path / "one", tmp_path / "two"]
    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda d: start_local_s3(data_dir=d, secret_key=f"secret-{d.name}"), dirs))
    try:
        all_ports = [set(s.ports.values()) for s in (s3, *servers)]
        assert len(set.union(*all_ports)) == sum(len(p) for p in all_ports)
        for server in servers:
            server.create_bucket("own-bucket")
            server.client().put_object(Bucket="own-bucket", Key="who", Body=server.data_dir.encode())
        for server in servers:
            assert server.client().get_object(Bucket="own-bucket", Key="who")["Body"].read() == server.data_dir.encode()
        assert "own-bucket" not in [b["Name"] for b in s3.client().list_buckets()["Buckets"]]
        # each server only knows its own secret
        other = local_s3._make_client(servers[0].endpoint_url, "fruit", servers[1].secret_key, "eu-central-1")
        with pytest.raises(ClientError):
            other.list_buckets()
    finally:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(LocalS3.stop, servers))
    for server, d in zip(servers, dirs, strict=True):
        assert server.process.returncode is not None
        assert (d / "weed.log").exists()  # a given data dir is kept


def test_stop_terminates_and_frees_ports():
    t0 = time.monotonic()
    server = start_local_s3(die_with_parent=True)  # temp data dir, removed by stop()
    started = time.monotonic() - t0
    data_dir, proc = server.data_dir, server.process
    assert os.path.isdir(data_dir) and proc.poll() is None
    t0 = time.monotonic()
    server.stop()
    stopped = time.monotonic() - t0
    assert proc.returncode is not None
    assert not server.is_running()
    assert stopped < local_s3.STOP_TIMEOUT
    for port in server.ports.values():
        assert _port_free(port), port
    assert not os.path.exists(data_dir)
    for component in local_s3._COMPONENTS:  # weed's own sockets in /tmp were cleaned up
        assert not os.path.exists(f"/tmp/seaweedfs-{component}-grpc-{server.ports[component + '.port.grpc']}.sock")
    server.stop()  # idempotent
    print(f"start {started:.1f} s, stop {stopped:.1f} s")


def test_fixed_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(OSError, match="already in use"):
            start_local_s3(data_dir=tmp_path, s3_port=busy.getsockname()[1])


def test_serve_cli_prints_exports_and_stops_on_sigint(tmp_path):
    port = local_s3._pick_ports(1, set())[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fruit_assets_dev.local_s3", "serve", "--dir", str(tmp_path / "data"), "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("# Ctrl+C"):
                break
        exports = dict(shlex.split(line)[1].split("=", 1) for line in lines if line.startswith("export "))
        assert exports == {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "fruit",
            "AWS_SECRET_ACCESS_KEY": "fruit-local-secret",
            "AWS_REGION": "eu-central-1",
            "AWS_DEFAULT_REGION": "eu-central-1",
            "FRUIT_IMAGES_URI": "s3://fruit/images",
            "FRUIT_STORAGE_URI": "s3://fruit/assets",
        }, lines
        weed_pid = int(lines[0].rsplit("pid ", 1)[1].split(".")[0])
        client = local_s3._make_client(
            exports["AWS_ENDPOINT_URL"], exports["AWS_ACCESS_KEY_ID"], exports["AWS_SECRET_ACCESS_KEY"], "eu-central-1"
        )
        assert "fruit" in [b["Name"] for b in client.list_buckets()["Buckets"]]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "Starting SeaweedFS" not in proc.stdout.read()  # weed's output is not on our stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(weed_pid, 0)
    assert _port_free(port)
    assert (tmp_path / "data" / "weed.log").exists()
