"""A throw-away RabbitMQ node with TLS only, for tests (the `tls_broker` fixture in conftest).

The node runs beside the main test broker as the current user, isolated from it: its own
node name, ports (TLS listener and Erlang distribution, both on 127.0.0.1; no plain AMQP
listener), Erlang cookie (HOME points into the temp folder), config, env file, data, logs
and an empty plugin list (so it does not fight the main node for the management port).
Certificates come from `fedsilo.privacy.certs`. The user, vhosts and permissions are in a
definitions file loaded at boot, so no (slow) `rabbitmqctl` call is needed before use.

Run `python tests/tls_broker.py` to start one, print how long that took, and stop it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedsilo.privacy.certs import CertPair, issue, make_ca

#: Debian/Ubuntu put a `su rabbitmq` wrapper on PATH (refused to other users, and it writes
#: the main node's startup log); the real scripts live here.
_REAL_BIN = Path("/usr/lib/rabbitmq/bin")
USER = "fedsilo"
LIMITED_USER = "fedsilo-silo"
VHOST = "fedsilo-tls"


class BrokerStartError(RuntimeError):
    """The TLS node could not be started (the message says why, with the log's tail)."""


def _tool(name: str) -> str | None:
    real = _REAL_BIN / name
    if real.is_file() and os.access(real, os.X_OK):
        return str(real)
    return shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


@dataclass(frozen=True)
class TlsBroker:
    """A running TLS node. `url` is amqps://fedsilo:<password>@localhost:<port>/fedsilo-tls
    (full permissions); `limited_url` is the same vhost as a user that may not configure
    anything (write and read only), like a provisioned silo. The client certificate is
    signed by the same CA as the server's; the node requires one (fail_if_no_peer_cert)."""

    url: str
    limited_url: str
    port: int
    ca_file: Path
    client_cert: Path
    client_key: Path
    ca: CertPair = field(repr=False)
    node: str
    workdir: Path
    _env: dict[str, str] = field(repr=False)

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """`rabbitmqctl -n <node> args...`; its stdout, or RuntimeError with its stderr."""
        ctl = _tool("rabbitmqctl")
        if ctl is None:
            raise RuntimeError("rabbitmqctl is not on PATH")
        result = subprocess.run(
            [ctl, "-n", self.node, *args],
            env=self._env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"`rabbitmqctl -n {self.node} {' '.join(args)}` failed "
                f"({result.returncode}): {result.stderr.strip() or result.stdout.strip()}"
            )
        return result.stdout


def _log_tail(workdir: Path, lines: int = 30) -> str:
    chunks = []
    for path in [*sorted((workdir / "log").glob("*.log")), workdir / "stdout.log"]:
        try:
            text = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            continue
        if text:
            chunks.append(f"--- {path.name}\n" + "\n".join(text))
    return "\n".join(chunks) or "(no log written)"


def _write_config(
    workdir: Path, port: int, certs: Path, users: dict[str, str], extra: Path | None = None
) -> None:
    (workdir / "rabbitmq.conf").write_text(
        "\n".join(
            [
                "listeners.tcp = none",
                f"listeners.ssl.default = 127.0.0.1:{port}",
                f"ssl_options.cacertfile = {certs / 'ca.pem'}",
                f"ssl_options.certfile = {certs / 'server.pem'}",
                f"ssl_options.keyfile = {certs / 'server.key'}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = true",
                "ssl_options.versions.1 = tlsv1.3",
                "ssl_options.versions.2 = tlsv1.2",
                f"load_definitions = {workdir / 'definitions.json'}",
                "disk_free_limit.absolute = 1MB",  # a full /tmp must not block the tests
                "log.console = false",
                "log.file.level = info",
                "",
            ]
        )
    )
    admin, limited = users[USER], users[LIMITED_USER]
    definitions = {
        "users": [
            {
                "name": name,
                "password_hash": _password_hash(password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
            for name, password in ((USER, admin), (LIMITED_USER, limited))
        ],
        "vhosts": [{"name": VHOST}],
        "permissions": [
            {"user": USER, "vhost": VHOST, "configure": ".*", "write": ".*", "read": ".*"},
            {"user": LIMITED_USER, "vhost": VHOST, "configure": "^$", "write": ".*", "read": ".*"},
        ],
    }
    if extra is not None:  # merged: the test users plus the provisioned ones
        more = json.loads(extra.read_text())
        for key in ("users", "vhosts", "permissions", "exchanges", "queues", "bindings"):
            definitions.setdefault(key, [])
            definitions[key] += [x for x in more.get(key, []) if x not in definitions[key]]
    (workdir / "definitions.json").write_text(json.dumps(definitions, indent=1))
    (workdir / "enabled_plugins").write_text("[].\n")
    (workdir / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's (it sets NODENAME)


def _environment(workdir: Path, node: str, dist_port: int) -> dict[str, str]:
    home = workdir / "home"
    home.mkdir(mode=0o700)
    cookie = home / ".erlang.cookie"
    cookie.write_text("".join(secrets.choice(string.ascii_uppercase) for _ in range(32)))
    cookie.chmod(0o400)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
    env.update(
        HOME=str(home),
        RABBITMQ_NODENAME=node,
        RABBITMQ_DIST_PORT=str(dist_port),
        RABBITMQ_CONFIG_FILE=str(workdir / "rabbitmq.conf"),
        RABBITMQ_ADVANCED_CONFIG_FILE=str(workdir / "advanced.config"),  # absent on purpose
        RABBITMQ_CONF_ENV_FILE=str(workdir / "rabbitmq-env.conf"),
        RABBITMQ_ENABLED_PLUGINS_FILE=str(workdir / "enabled_plugins"),
        RABBITMQ_MNESIA_BASE=str(workdir / "mnesia"),
        RABBITMQ_LOG_BASE=str(workdir / "log"),
        RABBITMQ_PID_FILE=str(workdir / "node.pid"),
        RABBITMQ_PLUGINS_EXPAND_DIR=str(workdir / "plugins-expand"),
        RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        ERL_EPMD_ADDRESS="127.0.0.1",  # only used if this node has to start epmd itself
    )
    return env


def start(
    timeout: float = 90.0,
    certs_from: Path | None = None,
    definitions: Path | None = None,
    port: int | None = None,
) -> tuple[TlsBroker, subprocess.Popen[bytes]]:
    """Start a TLS node in a fresh temp folder; BrokerStartError (folder removed) on failure.
    Stop it with `stop(broker, process)`.

    `certs_from`: a folder with ca.pem, server.pem and server.key to use (what `fedsilo
    provision --tls-host` writes to broker/tls) instead of a fresh CA; `definitions`: a
    definitions file loaded at boot in addition (the provisioned users, vhost, topology)."""
    server = _tool("rabbitmq-server")
    if server is None or _tool("rabbitmqctl") is None:
        raise BrokerStartError("rabbitmq-server/rabbitmqctl are not installed")
    workdir = Path(tempfile.mkdtemp(prefix="fedsilo-tls-broker-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        certs = workdir / "certs"
        ca = make_ca("fedsilo test CA")
        ca.write(certs / "ca.pem", certs / "ca.key")
        issue(
            ca, "localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"], server=True
        ).write(certs / "server.pem", certs / "server.key")
        if certs_from is not None:  # the provisioned server identity replaces the fresh one
            for name in ("ca.pem", "server.pem", "server.key"):
                (certs / name).unlink()
                shutil.copy(certs_from / name, certs / name)
        issue(ca, "fedsilo-test-client", client=True).write(
            certs / "client.pem", certs / "client.key"
        )
        port, dist_port = port or _free_port(), _free_port()
        node = f"fedsilo-tls-{secrets.token_hex(4)}@localhost"
        users = {USER: secrets.token_urlsafe(12), LIMITED_USER: secrets.token_urlsafe(12)}
        _write_config(workdir, port, certs, users, definitions)
        env = _environment(workdir, node, dist_port)
        with open(workdir / "stdout.log", "wb") as out:
            process = subprocess.Popen(
                [server],
                env=env,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a ^C in the terminal must not kill it before teardown
            )
        broker = TlsBroker(
            url=f"amqps://{USER}:{users[USER]}@localhost:{port}/{VHOST}",
            limited_url=f"amqps://{LIMITED_USER}:{users[LIMITED_USER]}@localhost:{port}/{VHOST}",
            port=port,
            ca_file=certs / "ca.pem",
            client_cert=certs / "client.pem",
            client_key=certs / "client.key",
            ca=ca,
            node=node,
            workdir=workdir,
            _env=env,
        )
        _wait_listening(process, port, timeout, workdir)
        return broker, process
    except BaseException as exc:
        if process is not None:
            _kill(process)
        tail = _log_tail(workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        if isinstance(exc, BrokerStartError):
            raise BrokerStartError(f"{exc}\n{tail}") from None
        raise


def _wait_listening(
    process: subprocess.Popen[bytes], port: int, timeout: float, workdir: Path
) -> None:
    """The TLS listener opens last in the boot sequence (after the definitions import)."""
    deadline = time.monotonic() + timeout
    while True:
        code = process.poll()
        if code is not None:
            raise BrokerStartError(f"the TLS node exited with status {code} while starting")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BrokerStartError(f"the TLS node did not listen on port {port} in {timeout:.0f} s")
        time.sleep(0.2)


def _kill(process: subprocess.Popen[bytes]) -> None:
    """TERM (the start script turns it into a clean stop), then KILL the process group."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # its own session: beam and helpers
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def stop(broker: TlsBroker, process: subprocess.Popen[bytes]) -> None:
    """Stop the node and remove its folder."""
    try:
        if process.poll() is None:
            try:
                broker.ctl("stop", timeout=60)
                process.wait(timeout=30)
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            _kill(process)
    finally:
        shutil.rmtree(broker.workdir, ignore_errors=True)


if __name__ == "__main__":
    began = time.monotonic()
    tls_broker, proc = start()
    print(
        f"started {tls_broker.node} on port {tls_broker.port} in {time.monotonic() - began:.1f} s"
    )
    began = time.monotonic()
    stop(tls_broker, proc)
    print(f"stopped in {time.monotonic() - began:.1f} s")
