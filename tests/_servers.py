"""Find (or start) the servers the tests run against: Redis, Valkey, memcached and PostgreSQL.

Plain functions, no fixtures (``tests/conftest.py`` wraps them). Each address comes from one
environment variable and falls back to a default:

==============================  ====================================================
``DECLCACHE_TEST_REDIS``        ``host:port``, default ``127.0.0.1:6379``
``DECLCACHE_TEST_VALKEY``       ``host:port``, no default: a private server by default
``DECLCACHE_TEST_MEMCACHED``    ``host:port``, default ``127.0.0.1:11211``
``DECLCACHE_TEST_POSTGRES_URL`` default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``
==============================  ====================================================

When nothing answers at the Redis or memcached address but the server binary is installed, a
private server is started on a free loopback port instead. Valkey has no usual address (6379 is
Redis's): unless ``DECLCACHE_TEST_VALKEY`` names one that answers, a private ``valkey-server``
is started, or a private ``redis-server`` where Valkey is not installed (Debian bookworm has no
package): it speaks the same protocol, which is all the ``valkey`` client needs.

PostgreSQL tests always get a fresh database of their own, dropped at exit. A server that
cannot be had skips the test locally and fails it under ``CI=true`` (see :func:`unavailable`).
Everything this module starts or creates is stopped or dropped when the process exits.

TLS with ACL users has no shared server: :func:`make_certificates` makes a throwaway CA and a
server certificate with ``openssl``, and :class:`TlsRedisProcess` runs a private
``redis-server`` that listens on its TLS port only, with the ``default`` user behind a
password of its own. A missing ``openssl``, or a ``redis-server`` built without TLS, skips
locally and fails under ``CI=true`` like a missing server.
"""

from __future__ import annotations

import abc
import atexit
import functools
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, ClassVar, NoReturn, Self

import pytest

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

REDIS_ENV = "DECLCACHE_TEST_REDIS"
VALKEY_ENV = "DECLCACHE_TEST_VALKEY"
MEMCACHED_ENV = "DECLCACHE_TEST_MEMCACHED"
POSTGRES_ENV = "DECLCACHE_TEST_POSTGRES_URL"

DEFAULT_REDIS = "127.0.0.1:6379"
DEFAULT_MEMCACHED = "127.0.0.1:11211"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

#: How long a freshly started server gets to answer.
START_TIMEOUT = 10.0

_OWNER_PID = os.getpid()


def in_ci() -> bool:
    """Tell whether the tests run under CI (``CI=true``), where a missing server is a failure."""
    return os.environ.get("CI") == "true"


def unavailable(reason: str) -> NoReturn:
    """Give up on a server: fail the test under CI, skip it otherwise."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing server is a failure)", pytrace=False)
    pytest.skip(reason)


def listening(host: str, port: int, timeout: float = 0.5) -> bool:
    """Tell whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def run_prefix() -> str:
    """Return a key prefix unique to this test run, e.g. ``"dct1a2b3c4d:"``."""
    return _run_prefix()


@functools.cache
def _run_prefix() -> str:
    return f"dct{secrets.token_hex(4)}:"


def _parse_address(env: str, default: str | None) -> tuple[str, int] | None:
    """The address ``env`` names, else ``default``; ``None`` when there is neither."""
    value = os.environ.get(env) or default
    if value is None:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{env}={value!r} is not 'host:port'")
    return host.strip("[]"), int(port)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _ask(host: str, port: int, request: bytes, expected: bytes, timeout: float = 0.5) -> bool:
    """Send one inline protocol command and tell whether the reply starts as expected."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(request)
            return sock.recv(64).startswith(expected)
    except OSError:
        return False


# --- private server processes ------------------------------------------------------------------

_started: list[ServerProcess] = []


def _stop_all() -> None:
    if os.getpid() != _OWNER_PID:  # a forked child must not stop its parent's servers
        return
    for server in _started:
        server.stop(kill=False)


atexit.register(_stop_all)


class ServerProcess(abc.ABC):
    """A server this module started on a loopback port; it can be stopped and started again.

    Data does not survive :meth:`stop`: the servers run without persistence.
    """

    #: Name of the server binary, looked up on ``PATH``.
    binary: ClassVar[str]
    #: Binaries that may serve in its place, in order, when ``binary`` is not installed.
    stand_ins: ClassVar[tuple[str, ...]] = ()

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port if port is not None else _free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        _started.append(self)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"

    @property
    def address(self) -> tuple[str, int]:
        """The ``(host, port)`` pair the server listens on."""
        return self.host, self.port

    @property
    def running(self) -> bool:
        """Whether the process is alive (it may not be answering yet)."""
        return self._process is not None and self._process.poll() is None

    @classmethod
    def executable(cls) -> str | None:
        """The path of the binary to run: ``binary``, else the first stand-in installed."""
        for name in (cls.binary, *cls.stand_ins):
            found = shutil.which(name)
            if found is not None:
                return found
        return None

    @classmethod
    def wanted(cls) -> str:
        """What must be installed, for messages: ``"valkey-server or redis-server"``."""
        return " or ".join((cls.binary, *cls.stand_ins))

    @abc.abstractmethod
    def _command(self, binary: str) -> list[str]:
        """Return the command line that runs the server in the foreground."""

    @abc.abstractmethod
    def ping(self) -> bool:
        """Tell whether the server answers its protocol's ping."""

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        """Start the server on its port (again) and wait until it answers.

        Calls :func:`unavailable` when the binary is missing or the server does not come up.
        """
        problem = self._launch(timeout)
        if problem is not None:
            unavailable(problem)
        return self

    def _launch(self, timeout: float) -> str | None:
        """Start the server; return why it is not answering, or None when it is."""
        if self.running:
            return None
        binary = self.executable()
        if binary is None:
            return (
                f"{self.wanted()} is not installed, cannot start a private server "
                "(run `bash scripts/services.sh`)"
            )
        if self._output is not None:
            self._output.close()
        self._output = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        self._process = subprocess.Popen(
            self._command(binary),
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping():
                return None
            if self._process.poll() is not None:
                break
            time.sleep(0.05)
        output = self._read_output()
        self.stop()
        return (
            f"{self.binary} on {self.host}:{self.port} did not answer within {timeout}s:\n{output}"
        )

    def stop(self, *, kill: bool = True) -> None:
        """Stop the server: SIGKILL (a crash) by default, SIGTERM with ``kill=False``."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _read_output(self) -> str:
        if self._output is None:
            return ""
        self._output.seek(0)
        return self._output.read().decode(errors="replace")[-2000:]

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class RedisProcess(ServerProcess):
    """A private ``redis-server`` without persistence."""

    binary = "redis-server"

    def _command(self, binary: str) -> list[str]:
        return [
            binary,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            tempfile.gettempdir(),
        ]

    def ping(self) -> bool:
        """Tell whether the server answers ``PING``."""
        return _ask(self.host, self.port, b"PING\r\n", b"+PONG")


class ValkeyProcess(RedisProcess):
    """A private ``valkey-server``, or ``redis-server`` where Valkey is not installed.

    Valkey 7.2 is a fork of Redis 7.2 and keeps its protocol and its command line, so the
    same arguments start either.
    """

    binary = "valkey-server"
    stand_ins = ("redis-server",)


class MemcachedProcess(ServerProcess):
    """A private ``memcached`` (TCP only)."""

    binary = "memcached"

    def _command(self, binary: str) -> list[str]:
        command = [binary, "-p", str(self.port), "-U", "0", "-l", self.host, "-m", "64"]
        if os.geteuid() == 0:  # memcached refuses to run as root
            command += ["-u", "nobody"]
        return command

    def ping(self) -> bool:
        """Tell whether the server answers ``version``."""
        return _ask(self.host, self.port, b"version\r\n", b"VERSION")


# --- TLS and ACL users ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """PEM files of a throwaway CA, a server certificate it signed, and a CA nobody trusts.

    The server certificate names ``127.0.0.1`` and ``localhost`` (subjectAltName), so clients
    verify the host name too. ``untrusted_ca`` signed nothing the server presents: a client
    that trusts only it must refuse the server.
    """

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    untrusted_ca: Path


def _openssl(openssl: str, directory: Path, *args: str) -> None:
    done = subprocess.run(
        [openssl, *args], cwd=directory, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        command = " ".join(["openssl", *args])
        unavailable(f"`{command}` failed ({done.returncode}):\n{done.stderr[-2000:]}")


_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
_CA_EXTENSIONS = (
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
)
_SERVER_EXTENSIONS = """\
subjectAltName = IP:127.0.0.1, DNS:localhost
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def make_certificates(directory: Path) -> Certificates:
    """Make a CA, a server certificate it signs, and an unrelated CA, in ``directory``.

    Calls :func:`unavailable` when ``openssl`` is not installed or fails.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        unavailable("openssl is not installed: cannot make the TLS test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    for name, subject in (("ca", "declcache test CA"), ("untrusted-ca", "nobody trusts me")):
        _openssl(
            openssl, directory, "req", "-x509", "-new", *_EC_KEY, "-days", "2",
            "-subj", f"/CN={subject}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
            *_CA_EXTENSIONS,
        )  # fmt: skip
    (directory / "server.ext").write_text(_SERVER_EXTENSIONS)
    _openssl(
        openssl, directory, "req", "-new", *_EC_KEY, "-subj", "/CN=127.0.0.1",
        "-keyout", "server.key", "-out", "server.csr",
    )  # fmt: skip
    _openssl(
        openssl, directory, "x509", "-req", "-in", "server.csr", "-days", "2",
        "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-extfile", "server.ext", "-out", "server.crt",
    )  # fmt: skip
    return Certificates(
        directory=directory,
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        untrusted_ca=directory / "untrusted-ca.crt",
    )


class TlsRedisProcess(RedisProcess):
    """A private ``redis-server`` on a TLS port only, its ``default`` user behind a password.

    ``--port 0`` turns the plain port off: every connection is TLS. Clients are not asked for
    a certificate (``--tls-auth-clients no``). :meth:`admin` is a client of the ``default``
    user, which may do anything; :meth:`set_user` creates ACL users with ``ACL SETUSER``.

    Args:
        certificates: the server's certificate and key, and the CA clients verify it with.
    """

    def __init__(self, certificates: Certificates, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self.certificates = certificates
        self.admin_password = secrets.token_urlsafe(16)

    def _command(self, binary: str) -> list[str]:
        certificates = self.certificates
        return [
            binary,
            "--port", "0",
            "--tls-port", str(self.port),
            "--bind", self.host,
            "--tls-cert-file", str(certificates.server_cert),
            "--tls-key-file", str(certificates.server_key),
            "--tls-ca-cert-file", str(certificates.ca),
            "--tls-auth-clients", "no",
            "--requirepass", self.admin_password,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(certificates.directory),
        ]  # fmt: skip

    def ping(self) -> bool:
        """Tell whether the server answers ``PING`` over TLS (``NOAUTH`` is an answer too)."""
        context = ssl.create_default_context(cafile=str(self.certificates.ca))
        try:
            with (
                socket.create_connection(self.address, timeout=0.5) as raw,
                context.wrap_socket(raw, server_hostname=self.host) as sock,
            ):
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def admin(self) -> Any:
        """A redis-py client of the ``default`` user over TLS (the caller closes it)."""
        import redis  # only the tests that run TLS need it

        return redis.Redis(
            host=self.host,
            port=self.port,
            password=self.admin_password,
            ssl=True,
            ssl_ca_certs=str(self.certificates.ca),
            socket_timeout=5,
        )

    def set_user(self, name: str, *rules: str) -> None:
        """``ACL SETUSER name reset rules…``: the user has exactly these rules afterwards."""
        client = self.admin()
        try:
            client.execute_command("ACL", "SETUSER", name, "reset", *rules)
        finally:
            client.close()


def start_tls_redis_server(certificates: Certificates) -> TlsRedisProcess:
    """Start a NEW private TLS-only Redis server with ``certificates`` on a free port."""
    return TlsRedisProcess(certificates).start()


def start_redis_server() -> RedisProcess:
    """Start a NEW private Redis server on a free loopback port (for tests that kill it)."""
    return RedisProcess().start()


def start_valkey_server() -> ValkeyProcess:
    """Start a NEW private Valkey (or stand-in Redis) server on a free loopback port."""
    return ValkeyProcess().start()


def start_memcached_server() -> MemcachedProcess:
    """Start a NEW private memcached on a free loopback port (for tests that kill it)."""
    return MemcachedProcess().start()


# --- shared servers ----------------------------------------------------------------------------


def redis_address() -> tuple[str, int]:
    """Return the Redis server to test against, starting a private one if needed."""
    return _shared(RedisProcess, REDIS_ENV, DEFAULT_REDIS)


def valkey_address() -> tuple[str, int]:
    """Return the Valkey server to test against: ``DECLCACHE_TEST_VALKEY`` or a private one."""
    return _shared(ValkeyProcess, VALKEY_ENV, None)


def memcached_address() -> tuple[str, int]:
    """Return the memcached server to test against, starting a private one if needed."""
    return _shared(MemcachedProcess, MEMCACHED_ENV, DEFAULT_MEMCACHED)


def _shared(kind: type[ServerProcess], env: str, default: str | None) -> tuple[str, int]:
    found = _discover(kind, env, default)
    if isinstance(found, str):
        unavailable(found)
    return found


@functools.cache
def _discover(kind: type[ServerProcess], env: str, default: str | None) -> tuple[str, int] | str:
    """Return the address, or why there is none (cached either way: no retry per test)."""
    address = _parse_address(env, default)
    if address is not None and listening(*address):
        return address
    if kind.executable() is None:
        if address is None:
            where = f"{env} is not set"
        else:
            where = f"no {kind.binary} answers on {address[0]}:{address[1]}"
        return (
            f"{where} and {kind.wanted()} is not installed: "
            f"set {env}=host:port or run `bash scripts/services.sh`"
        )
    server = kind()
    problem = server._launch(START_TIMEOUT)
    return server.address if problem is None else problem


# --- PostgreSQL --------------------------------------------------------------------------------


def postgres_urls() -> tuple[str, str]:
    """Create a fresh database for this process; return its (psycopg, asyncpg) URLs.

    The database is named ``declcache_test_<pid>_<hex>`` and dropped (``WITH (FORCE)``) at exit,
    so tests never touch a database they did not create.
    """
    found = _create_postgres_database()
    if isinstance(found, str):
        unavailable(found)
    return found


@functools.cache
def _create_postgres_database() -> tuple[str, str] | str:
    try:
        import sqlalchemy as sa
        from sqlalchemy.engine import make_url
    except ImportError as error:  # pragma: no cover - SQLAlchemy is a hard dependency
        return f"SQLAlchemy is not importable: {error}"

    raw = os.environ.get(POSTGRES_ENV) or DEFAULT_POSTGRES_URL
    base = make_url(raw).set(drivername="postgresql+psycopg")
    name = f"declcache_test_{os.getpid()}_{secrets.token_hex(4)}"
    shown = base.render_as_string(hide_password=True)
    try:
        admin = sa.create_engine(
            base, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
        )
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
    except Exception as error:  # any failure means "no PostgreSQL to test on"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        return (
            f"cannot create a test database on PostgreSQL at {shown}: {first_line}; "
            f"set {POSTGRES_ENV} or run `bash scripts/services.sh`"
        )
    atexit.register(_drop_postgres_database, base.render_as_string(hide_password=False), name)
    sync_url = base.set(database=name)
    async_url = sync_url.set(drivername="postgresql+asyncpg")
    return (
        sync_url.render_as_string(hide_password=False),
        async_url.render_as_string(hide_password=False),
    )


def _drop_postgres_database(admin_url: str, name: str) -> None:
    if os.getpid() != _OWNER_PID:
        return
    import sqlalchemy as sa

    try:
        admin = sa.create_engine(
            admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
        )
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()
    except Exception as error:  # at exit, report and go on
        print(f"tests/_servers.py: could not drop database {name}: {error}", file=sys.stderr)


# --- replicated Redis: a Sentinel group and a Cluster with replicas -----------------------------
#
# Failover tests kill or freeze one server of a group and watch another take over, so every
# server here has a directory of its own (a replica writes the snapshot it syncs from its
# master to ``dir``: side by side in the temp directory they would share one ``dump.rdb``).


def _distinct_free_ports(count: int) -> list[int]:
    """``count`` free loopback ports, all different."""
    ports: list[int] = []
    while len(ports) < count:
        port = _free_port()
        if port not in ports:
            ports.append(port)
    return ports


def redis_client(address: tuple[str, int], timeout: float = 2.0) -> Any:
    """A plain redis-py client of one server (the caller closes it)."""
    import redis  # only the tests of replicated groups need it here

    host, port = address
    return redis.Redis(host=host, port=port, socket_timeout=timeout, socket_connect_timeout=timeout)


def _wait_until(check: Any, what: str, timeout: float) -> None:
    """Poll ``check()`` (errors count as "not yet") until it holds; else :func:`unavailable`."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as error:  # a server still starting up answers with errors
            last = error
        time.sleep(0.05)
    unavailable(f"{what} not within {timeout}s (last error: {last!r})")


def _text(value: Any) -> str:
    """A reply item as text (redis-py answers bytes unless told to decode)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _info(address: tuple[str, int], section: str) -> dict[str, Any]:
    client = redis_client(address)
    try:
        info: dict[str, Any] = client.info(section)
        return info
    finally:
        client.close()


class GroupRedisProcess(RedisProcess):
    """A private ``redis-server`` of a replicated group: own directory, optional ``--replicaof``.

    It can be frozen (``SIGSTOP``: it keeps its sockets but answers nothing, as a hung host)
    and thawed (``SIGCONT``). :meth:`stop` thaws it first, so a ``SIGTERM`` is not left pending.

    Args:
        workdir: the server's directory (its snapshot file is named after its port).
        replica_of: the ``(host, port)`` of the master to replicate from its start, if any.
        extra: more ``--option value`` arguments (cluster mode, for one).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        replica_of: tuple[str, int] | None = None,
        extra: tuple[str, ...] = (),
        port: int | None = None,
    ) -> None:
        super().__init__(port=port)
        self.workdir = workdir
        self.replica_of = replica_of
        self.extra = extra
        self.frozen = False

    def _command(self, binary: str) -> list[str]:
        command = [
            binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.workdir),
            "--dbfilename", f"dump-{self.port}.rdb",
            "--repl-diskless-load", "on-empty-db",
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        if self.replica_of is not None:
            command += ["--replicaof", self.replica_of[0], str(self.replica_of[1])]
        return [*command, *self.extra]

    @property
    def pid(self) -> int:
        """The process id of the running server."""
        if self._process is None:
            raise RuntimeError(f"{self!r} is not running")
        return self._process.pid

    def freeze(self) -> None:
        """``SIGSTOP``: the server hangs, connections and data intact."""
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        """``SIGCONT``: the server goes on where it stopped."""
        if self.frozen and self.running:
            os.kill(self.pid, signal.SIGCONT)
        self.frozen = False

    def stop(self, *, kill: bool = True) -> None:
        """See :meth:`ServerProcess.stop`; a frozen server is thawed first."""
        if self.frozen:
            self.thaw()
        super().stop(kill=kill)

    def role(self) -> str:
        """``"master"`` or ``"slave"``, as ``INFO replication`` says."""
        return str(_info(self.address, "replication")["role"])

    def in_sync(self) -> bool:
        """Whether this replica's link to its master is up (a master: always)."""
        info = _info(self.address, "replication")
        return info["role"] == "master" or info.get("master_link_status") == "up"


class RedisSentinelProcess(RedisProcess):
    """A private ``redis-server <config> --sentinel`` watching one master as ``service``.

    Its configuration file lives in ``workdir`` (Sentinel rewrites it as it learns the group).
    """

    def __init__(
        self,
        workdir: Path,
        master: tuple[str, int],
        *,
        service: str = "mymaster",
        quorum: int = 2,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 2000,
    ) -> None:
        super().__init__()
        self.service = service
        self.config = workdir / f"sentinel-{self.port}.conf"
        self.config.write_text(
            f"port {self.port}\n"
            f"bind {self.host}\n"
            f"dir {workdir}\n"
            f"sentinel monitor {service} {master[0]} {master[1]} {quorum}\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {service} 1\n"
        )

    def _command(self, binary: str) -> list[str]:
        return [binary, str(self.config), "--sentinel"]

    def master_state(self) -> dict[str, str]:
        """``SENTINEL MASTER <service>`` as a dict of texts."""
        client = redis_client(self.address)
        try:
            flat = client.execute_command("SENTINEL", "MASTER", self.service)
        finally:
            client.close()
        pairs = flat.items() if isinstance(flat, dict) else zip(flat[::2], flat[1::2], strict=True)
        return {_text(key): _text(value) for key, value in pairs}

    def master_address(self) -> tuple[str, int]:
        """The master this Sentinel names now (``GET-MASTER-ADDR-BY-NAME``)."""
        client = redis_client(self.address)
        try:
            host, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        finally:
            client.close()
        return _text(host), int(port)


class RedisSentinelGroup:
    """One master, one replica of it and ``sentinels`` Sentinels (quorum 2), on free ports.

    A context manager: ``with RedisSentinelGroup(tmp_path) as group: ...`` starts every server
    and waits until the replica is in sync and each Sentinel knows the replica and the other
    Sentinels (so that a failover can happen); everything is stopped on exit.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        service: str = "mymaster",
        sentinels: int = 3,
        down_after_ms: int = 500,
        failover_timeout_ms: int = 2000,
    ) -> None:
        self.service = service
        self.master = GroupRedisProcess(workdir)
        self.replica = GroupRedisProcess(workdir, replica_of=self.master.address)
        self.sentinels = [
            RedisSentinelProcess(
                workdir,
                self.master.address,
                service=service,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
            )
            for _ in range(sentinels)
        ]

    @property
    def servers(self) -> list[GroupRedisProcess]:
        """The master and the replica, as they were started."""
        return [self.master, self.replica]

    @property
    def url(self) -> str:
        """``redis+sentinel://h:p,h:p,h:p/<service>``."""
        nodes = ",".join(f"{s.host}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{nodes}/{self.service}"

    def start(self, timeout: float = 30.0) -> Self:
        """Start every server; wait until a failover could happen (see the class doc)."""
        try:
            self.master.start()
            self.replica.start()
            _wait_until(self.replica.in_sync, "the Sentinel group's replica in sync", timeout)
            for sentinel in self.sentinels:
                sentinel.start()
            others = str(len(self.sentinels) - 1)

            def ready() -> bool:
                states = [sentinel.master_state() for sentinel in self.sentinels]
                return all(
                    state.get("num-slaves") == "1" and state.get("num-other-sentinels") == others
                    for state in states
                )

            _wait_until(ready, "every Sentinel knowing the replica and the others", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every server of the group (SIGKILL)."""
        for server in [*self.sentinels, self.replica, self.master]:
            server.stop()

    def master_address(self) -> tuple[str, int] | None:
        """The master the first Sentinel that answers names, or None when none answers."""
        for sentinel in self.sentinels:
            try:
                return sentinel.master_address()
            except Exception:  # try the next Sentinel
                continue
        return None

    def server_at(self, address: tuple[str, int]) -> GroupRedisProcess:
        """The master or replica listening on ``address``."""
        for server in self.servers:
            if server.address == address:
                return server
        raise LookupError(f"no server of the group on {address}")

    def wait_for_new_master(self, old: tuple[str, int], timeout: float = 30.0) -> GroupRedisProcess:
        """Wait until every Sentinel names a master other than ``old`` and it says it is one.

        Raises:
            TimeoutError: no failover within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                named = {sentinel.master_address() for sentinel in self.sentinels}
                if len(named) == 1 and old not in named:
                    server = self.server_at(named.pop())
                    if server.role() == "master":
                        return server
            except Exception:  # a Sentinel mid-failover: ask again
                pass
            time.sleep(0.05)
        raise TimeoutError(f"Sentinel did not replace the master {old} within {timeout}s")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


#: Redis Cluster's hash slots.
CLUSTER_SLOTS = 16384


class RedisClusterNodeProcess(GroupRedisProcess):
    """A private ``redis-server`` in cluster mode, its bus on a free port of its own.

    ``cluster-replica-validity-factor 0``: a replica may always take over, however long its
    link to the master was down (a loaded test machine must not block the failover).
    """

    def __init__(self, workdir: Path, *, node_timeout_ms: int = 1000) -> None:
        port, self.bus_port = _distinct_free_ports(2)
        extra = (
            "--cluster-enabled", "yes",
            "--cluster-port", str(self.bus_port),
            "--cluster-config-file", str(workdir / f"nodes-{port}.conf"),
            "--cluster-node-timeout", str(node_timeout_ms),
            "--cluster-replica-validity-factor", "0",
        )  # fmt: skip
        super().__init__(workdir, extra=extra, port=port)

    def node_id(self) -> str:
        """``CLUSTER MYID``."""
        client = redis_client(self.address)
        try:
            found = client.execute_command("CLUSTER", "MYID")
        finally:
            client.close()
        return _text(found)

    def cluster_nodes(self) -> list[dict[str, Any]]:
        """This node's view of the cluster (``CLUSTER NODES``), one dict per node.

        Keys: ``id``, ``address`` (``(host, port)``), ``flags`` (a set), ``master`` (the
        master's id or ``"-"``), ``link`` (``connected``/``disconnected``), ``slots``.
        """
        client = redis_client(self.address)
        try:
            text = client.execute_command("CLUSTER", "NODES")
        finally:
            client.close()
        if isinstance(text, bytes):
            text = text.decode()
        if isinstance(text, dict):  # some redis-py versions parse it already
            raise TypeError("CLUSTER NODES came back parsed; expected the raw text")
        nodes = []
        for line in str(text).splitlines():
            fields = line.split()
            if len(fields) < 8:
                continue
            host_port = fields[1].split("@")[0]
            host, _, port = host_port.rpartition(":")
            nodes.append(
                {
                    "id": fields[0],
                    "address": (host, int(port)) if port.isdigit() else None,
                    "flags": set(fields[2].split(",")),
                    "master": fields[3],
                    "link": fields[7],
                    "slots": fields[8:],
                }
            )
        return nodes

    def cluster_state(self) -> str:
        """``cluster_state`` of ``CLUSTER INFO``: ``ok`` or ``fail``."""
        client = redis_client(self.address)
        try:
            return str(client.cluster("info")["cluster_state"])
        finally:
            client.close()


class RedisClusterGroup:
    """A Redis Cluster of ``masters`` masters with one replica each, on free ports.

    Made with plain cluster commands (no ``redis-cli`` needed): each master gets a distinct
    config epoch and an even range of slots, they all ``CLUSTER MEET``, then each replica
    ``CLUSTER REPLICATE``s its master. A context manager: on entry, every node is started and
    every node sees every replica in sync and the cluster ``ok``; on exit all are stopped.
    """

    def __init__(self, workdir: Path, *, masters: int = 3, node_timeout_ms: int = 1000) -> None:
        self.masters = [
            RedisClusterNodeProcess(workdir, node_timeout_ms=node_timeout_ms)
            for _ in range(masters)
        ]
        self.replicas = [
            RedisClusterNodeProcess(workdir, node_timeout_ms=node_timeout_ms)
            for _ in range(masters)
        ]

    @property
    def nodes(self) -> list[RedisClusterNodeProcess]:
        """Every node, masters first, as they were started."""
        return [*self.masters, *self.replicas]

    @property
    def url(self) -> str:
        """``redis+cluster://h:p,...`` naming every node."""
        return "redis+cluster://" + ",".join(f"{n.host}:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0) -> Self:
        """Start and join the nodes; wait until the cluster is ``ok`` with every replica."""
        try:
            for node in self.nodes:
                node.start()
            self._join(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _join(self, timeout: float) -> None:
        per_master = CLUSTER_SLOTS // len(self.masters)
        for index, node in enumerate(self.masters):
            first = index * per_master
            last = CLUSTER_SLOTS - 1 if index == len(self.masters) - 1 else first + per_master - 1
            client = redis_client(node.address)
            try:
                client.execute_command("CLUSTER", "SET-CONFIG-EPOCH", index + 1)
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            finally:
                client.close()
        meeting = redis_client(self.masters[0].address)
        try:
            for node in self.nodes[1:]:
                meeting.execute_command("CLUSTER", "MEET", node.host, node.port, node.bus_port)
        finally:
            meeting.close()
        count = len(self.nodes)

        def all_met() -> bool:
            return all(
                sum("handshake" not in n["flags"] for n in node.cluster_nodes()) == count
                for node in self.nodes
            )

        _wait_until(all_met, "every cluster node knowing every other", timeout)
        ids = [master.node_id() for master in self.masters]
        for replica, master_id in zip(self.replicas, ids, strict=True):
            client = redis_client(replica.address)
            try:
                client.execute_command("CLUSTER", "REPLICATE", master_id)
            finally:
                client.close()

        def ready() -> bool:
            for node in self.nodes:
                view = node.cluster_nodes()
                replicas = [n for n in view if "slave" in n["flags"] and n["master"] in ids]
                if len(replicas) != len(self.replicas) or node.cluster_state() != "ok":
                    return False
            return all(replica.in_sync() for replica in self.replicas)

        _wait_until(ready, "the Redis Cluster ok with every replica in sync", timeout)

    def stop(self) -> None:
        """Stop every node (SIGKILL)."""
        for node in self.nodes:
            node.stop()

    def masters_now(self, asked: RedisClusterNodeProcess) -> list[RedisClusterNodeProcess]:
        """The nodes ``asked`` sees as masters serving slots, not failing."""
        serving = {
            n["address"]
            for n in asked.cluster_nodes()
            if "master" in n["flags"] and n["slots"] and not {"fail", "fail?"} & n["flags"]
        }
        return [node for node in self.nodes if node.address in serving]

    def master_of(self, key: str) -> RedisClusterNodeProcess:
        """The master serving ``key``'s hash slot now (asked of a live node)."""
        asked = next(node for node in self.nodes if node.running and not node.frozen)
        client = redis_client(asked.address)
        try:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
        finally:
            client.close()
        for entry in asked.cluster_nodes():
            if "master" not in entry["flags"]:
                continue
            for served in entry["slots"]:
                if served.startswith("["):  # a slot being migrated
                    continue
                first, _, last = served.partition("-")
                if int(first) <= slot <= int(last or first):
                    return next(node for node in self.nodes if node.address == entry["address"])
        raise LookupError(f"no master serves slot {slot} of {key!r}")

    def wait_for_takeover(
        self, lost: RedisClusterNodeProcess, timeout: float = 30.0
    ) -> RedisClusterNodeProcess:
        """Wait until ``lost``'s replica serves its slots and every live node says ``ok``.

        Raises:
            TimeoutError: no replica took over within ``timeout`` seconds.
        """
        heir = self.replicas[self.masters.index(lost)] if lost in self.masters else None
        if heir is None:
            raise ValueError(f"{lost!r} is not one of the masters the cluster started with")
        live = [node for node in self.nodes if node is not lost and node.running]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all(
                    node.cluster_state() == "ok" and heir in self.masters_now(node) for node in live
                ):
                    return heir
            except Exception:  # a node mid-election: ask again
                pass
            time.sleep(0.05)
        raise TimeoutError(f"no replica took over from {lost!r} within {timeout}s")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
