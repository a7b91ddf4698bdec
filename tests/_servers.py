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
