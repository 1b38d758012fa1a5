"""A real Flower deployment on this machine: one SuperLink and N SuperNodes on 127.0.0.1, then `flwr run`.

This is the simulation's ServerApp and ClientApp unchanged, served by real Flower processes that talk
over the network: each SuperNode is its own `flower-supernode` process that loads only its partition
(`--node-config "partition-id=i num-partitions=N"`), or, with `--node-data DIR` once per node, trains on
that folder alone (`--node-config "data-dir='DIR' node-name='node<i>'"`, run config client-data=local: the
server never reads the folders), and runs the ClientApp in a subprocess. Flower
1.42's SuperLink serves the Fleet API (SuperNodes), the Control API (`flwr`) and the Runtime API over
one HTTP(S) port; `--fleet-api-type grpc-rere` is deprecated and no longer selects another transport.

Modes:
- `--insecure`: plain HTTP, no node identities; a quick try.
- default (`--tls --auth`): a self-signed CA and a server certificate for 127.0.0.1/localhost are made
  under `<workdir>/certs` (Python `cryptography`, which Flower already needs); every node gets an EC
  key pair in OpenSSH format under `<workdir>/keys`, is registered with `flwr supernode register`, and
  the SuperLink runs with `--enable-supernode-auth`, so only registered nodes may join.

Usage: python -m deploy.local_cluster --nodes 3 [--insecure] [--run-config "k=v ..."] [--workdir DIR]
       python -m deploy.local_cluster --node-data DIR1 --node-data DIR2 ... [--insecure] [--run-config "k=v ..."]
Every process is stopped on exit (also on errors, Ctrl-C and SIGTERM); every wait has a timeout. Nothing
it started outlives it, not even after `kill -9` of its process group: the SuperLink and every SuperNode
run in sessions of their own, under the launcher's watchdog (`server_app.watchdog`).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flcore.config import ConfigError
from flcore.files import unwritable
from flcore.run_config import parse_overrides
from server_app import launch
from server_app.preflight import InputError
from server_app.watchdog import Watchdog, exit_on_signals

CONNECTION = "mllm-cluster"
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Tls:
    ca: Path
    cert: Path
    key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path, fmt: serialization.PrivateFormat) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    path.chmod(0o600)


def make_certificates(folder: Path, days: int = 30) -> Tls:
    """A throw-away CA and a server certificate it signs, valid for 127.0.0.1 and localhost."""
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("mllm-llava-fl local CA"))
        .issuer_name(_name("mllm-llava-fl local CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))])
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    tls = Tls(folder / "ca.crt", folder / "server.pem", folder / "server.key")
    tls.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    tls.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, tls.key, serialization.PrivateFormat.TraditionalOpenSSL)
    return tls


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """An EC (P-384) key pair in OpenSSH format, as `ssh-keygen -t ecdsa -b 384` makes: (private, public)."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    _write_key(key, private, serialization.PrivateFormat.OpenSSH)
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n"
    )
    return private, public


@dataclass
class LocalCluster:
    """A SuperLink and SuperNodes on 127.0.0.1 under `workdir`; use as a context manager so all stop."""

    workdir: Path
    nodes: int
    tls: bool = True
    auth: bool = True
    node_data: Sequence[Path] = ()  # node i's own image folder (client-data=local); empty: partitions
    procs: list[subprocess.Popen] = field(default_factory=list)
    link: subprocess.Popen | None = None
    watchdog: Watchdog | None = None  # ends every process started here if this process dies, even by kill -9

    def __post_init__(self) -> None:
        self.workdir = self.workdir.resolve()
        self.home = self.workdir / "superlink"
        self.env = launch.run_env(self.home)
        self.port = launch.free_port()
        self.certs = make_certificates(self.workdir / "certs") if self.tls else None

    def __enter__(self) -> LocalCluster:
        try:
            self.start_superlink()
            for pid in range(self.nodes):
                self.start_supernode(pid)
            self.wait_for_nodes(self.nodes)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def security_args(self) -> list[str]:
        if self.certs is None:
            return ["--insecure"]
        return ["--ssl-ca-certfile", str(self.certs.ca), "--ssl-certfile", str(self.certs.cert)] + [
            "--ssl-keyfile",
            str(self.certs.key),
        ]

    def start_superlink(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        launch.write_connection(self.home, self.port, CONNECTION, self.certs.ca if self.certs else None)
        args = self.security_args() + (["--enable-supernode-auth"] if self.auth else [])
        self.link = launch.start_superlink(self.home, self.port, self.env, args)
        self.watchdog = Watchdog.start([self.link.pid])

    def node_config(self, pid: int, data_dir: Path | None = None) -> str:
        """Node `pid`'s --node-config: its own folder and a name when it has one, else its partition."""
        data_dir = data_dir or (self.node_data[pid] if pid < len(self.node_data) else None)
        if data_dir is None:
            return f"partition-id={pid} num-partitions={self.nodes}"
        return f"data-dir={json.dumps(str(Path(data_dir).resolve()))} node-name={json.dumps(f'node{pid}')}"

    def node_args(self, pid: int, key: Path | None, data_dir: Path | None = None) -> list[str]:
        trust = ["--root-certificates", str(self.certs.ca)] if self.certs else ["--insecure"]
        args = [
            sys.executable,
            "-m",
            "client_app.supernode",  # checks the node's own data-dir, then becomes flower-supernode
            *trust,
            "--superlink",
            f"{HOST}:{self.port}",
            "--node-config",
            self.node_config(pid, data_dir),
            "--port",
            str(launch.free_port()),
            "--max-wait-time",
            "120",
        ]
        return args + (["--auth-supernode-private-key", str(key)] if key else [])

    def register(self, public: Path) -> None:
        cmd = [str(launch.BIN / "flwr"), "supernode", "register", str(public), CONNECTION]
        out = subprocess.run(cmd, cwd=launch.PROJECT, env=self.env, capture_output=True, text=True, timeout=60)
        if out.returncode:
            raise RuntimeError(f"flwr supernode register {public} failed: {out.stdout}{out.stderr}")

    def start_supernode(self, pid: int, register: bool = True, data_dir: Path | None = None) -> subprocess.Popen:
        """Node `pid` with its own FLWR_HOME; with auth, its key is made (unless it exists: a restarted node
        keeps its identity) and, unless told not to, registered. `data_dir`: a node added with its own folder."""
        key = None
        if self.auth:
            key, public = self.workdir / "keys" / f"node{pid}", self.workdir / "keys" / f"node{pid}.pub"
            if not key.is_file():
                key, public = make_node_key(self.workdir / "keys", f"node{pid}")
                if register:
                    self.register(public)
        home = self.workdir / f"node{pid}"
        home.mkdir(parents=True, exist_ok=True)
        log = home / "supernode.log"
        proc = launch.start_process(self.node_args(pid, key, data_dir), log, launch.run_env(home), append=True)
        self.procs.append(proc)
        if self.watchdog is not None:
            self.watchdog.add(proc.pid)
        return proc

    def online_nodes(self) -> int:
        cmd = [str(launch.BIN / "flwr"), "supernode", "list", CONNECTION, "--format", "json"]
        out = subprocess.run(cmd, cwd=launch.PROJECT, env=self.env, capture_output=True, text=True, timeout=60)
        if out.returncode:
            return 0
        nodes = json.loads(out.stdout).get("nodes", [])
        return sum(str(n.get("status", "")).lower() == "online" for n in nodes)

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"a SuperNode exited with {proc.returncode}; see {self.workdir}/node*/supernode.log"
                    )
            if self.online_nodes() >= count:
                return
            time.sleep(1)
        raise RuntimeError(f"{count} SuperNodes did not come online within {timeout:.0f} s; see {self.workdir}")

    def run(self, sent: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
        return launch.flwr_run(CONNECTION, self.env, sent, timeout=timeout)

    def stop(self) -> None:
        """End every node and the SuperLink with their process trees; a process the tree walk missed (it
        exited and a new one took its pid, or it had not yet shown up in /proc) is killed directly."""
        for proc in [*self.procs, *([self.link] if self.link else [])]:
            launch.stop(proc)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        if self.watchdog is not None:
            self.watchdog.close()


def parser() -> argparse.ArgumentParser:
    parser = launch.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes to start (= num-clients)")
    parser.add_argument(
        "--node-data",
        type=Path,
        action="append",
        default=[],
        help="one SuperNode per use, training on this folder of its own (client-data=local; --nodes is ignored)",
    )
    parser.add_argument("--insecure", action="store_true", help="plain HTTP and no node authentication")
    parser.add_argument("--workdir", type=Path, default=launch.PROJECT / ".flwr-cluster")
    parser.add_argument("--run-config", "-c", action="append", default=[], help="overrides: 'k=v ...' or a TOML file")
    return parser


def check_cluster_args(args: argparse.Namespace) -> int:
    """The cluster's own inputs, before the run's preflight: the number of nodes, each node's folder and the
    work folder the certificates, keys and logs go to. Returns the number of nodes."""
    nodes = len(args.node_data) or args.nodes
    if nodes < 1:
        raise ConfigError(f"--nodes {nodes}: expected at least 1 SuperNode (or one --node-data per node).")
    for folder in args.node_data:
        if not folder.expanduser().is_dir():
            raise ConfigError(f"--node-data '{folder}': no such folder; each node trains on a folder of its images.")
    why = unwritable(args.workdir.expanduser())
    if why is not None:
        raise ConfigError(
            f"--workdir '{args.workdir}': the cluster cannot write its certificates, keys and logs there ({why}); "
            "give a writable folder."
        )
    return nodes


def main(argv: Sequence[str] | None = None) -> int:
    """Check everything (the cluster's arguments, then the launcher's preflight), then start the cluster and run."""
    exit_on_signals()  # SIGTERM unwinds the `with LocalCluster`, which stops every process
    defaults, _ = launch.project_settings()
    try:
        args = parser().parse_args(argv)
        nodes = check_cluster_args(args)
        local = {"client-data": "local"} if args.node_data else {}
        # real nodes serve the partition of their own node config (the server asks each one for it)
        overrides = {
            "partition-assignment": "node",
            **parse_overrides(args.run_config),
            "num-clients": nodes,
            **local,
        }
        cfg, sent = launch.resolve(overrides, defaults)
        launch.check_before_start(cfg)  # the launcher's preflight, before any process starts
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    secure = not args.insecure
    with LocalCluster(args.workdir, nodes, tls=secure, auth=secure, node_data=args.node_data) as cluster:
        mode = "TLS + SuperNode authentication" if secure else "insecure"
        print(f"SuperLink on {HOST}:{cluster.port} ({mode}), {nodes} SuperNodes online", flush=True)
        status = cluster.run(sent)
    return launch.report_status(status, str(cluster.home / "superlink.log"))


if __name__ == "__main__":
    sys.exit(main())
