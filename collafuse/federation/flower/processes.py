"""Start, wait for and stop a Flower SuperLink and its SuperNodes as local processes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from collafuse.federation.flower.certs import Certificates

# Every process we start gets these. The last one is also inherited by any SuperLink that
# `flwr` starts by itself (the managed one behind `flwr run .`): without it Flower runs
# `uv sync` on the app's dependencies at run time and may pull a CUDA torch.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
CONNECTION = "collafuse"  # name of the SuperLink connection in $FLWR_HOME/config.toml
_NODE_ID_LINE = re.compile(r"SuperNode ID: (\d+)")
_RUN_ID_LINE = re.compile(r"Successfully started run (\d+)")
_POLL_S = 0.2

ConfigValue = str | int | float | bool


class FlowerProcessError(RuntimeError):
    """A Flower process failed to start, exited early or timed out; the message ends with its log tail."""


def flower_env(flwr_home: str | Path) -> dict[str, str]:
    """Environment for Flower processes: no telemetry/update check/dependency install, own FLWR_HOME, venv on PATH."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    # SuperLink/SuperNode start `flower-superexec`, `flwr-serverapp`, `flwr-clientapp` by name.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it), so parallel runs do not collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def format_config(values: Mapping[str, ConfigValue]) -> str:
    """Render a mapping as Flower's `--node-config` / `--run-config` string: `key=value` pairs, TOML values."""
    parts = []
    for key, value in values.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise ValueError(f"config key {key!r} is invalid; use letters, digits, '-', '_' or '.'.")
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, (int, float)):
            rendered = repr(value)
        elif isinstance(value, (str, Path)):
            value = str(value)
            if "'" in value or "\n" in value:
                raise ValueError(f"config value for {key!r} contains a quote or newline: {value!r}; rename it.")
            rendered = f"'{value}'"  # TOML literal string: backslashes and spaces pass unchanged
        else:
            raise ValueError(f"config value for {key!r} has type {type(value).__name__}; use str, int, float or bool.")
        parts.append(f"{key}={rendered}")
    return " ".join(parts)


def write_connection(
    flwr_home: str | Path, address: str, *, root_certificates: Path | None, name: str = CONNECTION
) -> Path:
    """Write $FLWR_HOME/config.toml with one default SuperLink connection (TLS if root_certificates is given)."""
    security = (
        f'root-certificates = "{Path(root_certificates).resolve()}"' if root_certificates else "insecure = true"
    )
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{security}\n')
    return path


@dataclass
class FlowerProcess:
    """One started process (own process group) and the file its output goes to."""

    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        """The process id (also its process group id)."""
        return self.popen.pid

    def is_running(self) -> bool:
        """True while the process has not exited."""
        return self.popen.poll() is None

    def log_tail(self, n_lines: int = 25) -> str:
        """The last lines of the process's output."""
        if not self.log_path.exists():
            return "(no log yet)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n_lines:])

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the process and every process it started: SIGTERM, then SIGKILL after `timeout`."""
        stop_process_tree(self.popen, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the process and every process it started (simulates a crash)."""
        kill_process_tree(self.popen)


@dataclass(frozen=True)
class FlowerRun:
    """The outcome of one `flwr run`, with the run's final status as the SuperLink reports it."""

    run_id: int
    status: str  # "finished:completed", "finished:failed", "finished:stopped"
    status_details: str
    inbound_bytes: int  # SuperLink's count of the run's network traffic
    outbound_bytes: int
    output: str  # what `flwr run --stream` printed: the ServerApp's logs
    wall_s: float  # submit to end of the log stream

    @property
    def completed(self) -> bool:
        """True if the ServerApp ran to its end without raising."""
        return self.status == "finished:completed"


def start_process(name: str, command: list[str], log_path: Path, env: Mapping[str, str]) -> FlowerProcess:
    """Start `command` in its own process group with stdout+stderr going to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=dict(env),
            start_new_session=True,
        )
    return FlowerProcess(name, popen, log_path)


def stop_process_tree(popen: subprocess.Popen, timeout: float = 5.0) -> None:
    """Terminate a started process and all its descendants, by pid: SIGTERM, then SIGKILL after `timeout`."""
    # Collected while the parents live: the SuperLink starts its SuperExec in a new session,
    # so signalling the SuperLink's process group alone would miss it.
    descendants = _descendants(popen.pid)
    # The root alone first, so it stops and reaps its own children (an orphan can stay a zombie).
    _signal([popen.pid], signal.SIGTERM)
    _wait_gone([popen.pid], popen, timeout)
    _signal_group(popen.pid, signal.SIGTERM)
    _signal(descendants, signal.SIGTERM)
    _wait_gone(descendants, popen, timeout)
    _signal_group(popen.pid, signal.SIGKILL)
    _signal([pid for pid in descendants if _alive(pid, popen)], signal.SIGKILL)
    popen.wait()


def kill_process_tree(popen: subprocess.Popen) -> None:
    """SIGKILL a started process and all its descendants at once, like a machine that loses power."""
    descendants = _descendants(popen.pid)
    _signal_group(popen.pid, signal.SIGKILL)
    _signal(descendants, signal.SIGKILL)
    popen.wait()


class LocalFederation:
    """A SuperLink and its SuperNodes on this machine; leaving the `with` block stops every process it started."""

    def __init__(
        self,
        workdir: str | Path,
        *,
        certs: Certificates | None = None,
        insecure: bool = False,
        simulation: bool = False,
        host: str = "127.0.0.1",
        ready_timeout: float = 30.0,
    ) -> None:
        if certs is None and not insecure:
            raise ValueError(
                "certs is None: pass certs=make_certificates(...) for TLS + SuperNode authentication, "
                "or insecure=True to run without them (local experiments only)."
            )
        if certs is not None and insecure:
            raise ValueError("certs given together with insecure=True; pass one of them.")
        self.workdir = Path(workdir).resolve()
        self.certs = certs
        self.simulation = simulation
        self.host = host
        self.ready_timeout = ready_timeout
        self.flwr_home = self.workdir / "flwr-home"
        self.env = flower_env(self.flwr_home)
        self.superlink: FlowerProcess | None = None
        self.supernodes: list[FlowerProcess] = []
        self._runs = 0
        self._superlink_starts = 0
        self.address = ""

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start_superlink(self) -> str:
        """Start the SuperLink on a free port, wait until it answers, write the CLI connection; return host:port."""
        if self.superlink is not None:
            raise ValueError("the SuperLink is already started; use restart_superlink() to restart it.")
        self.address = f"{self.host}:{free_port(self.host)}"
        write_connection(self.flwr_home, self.address, root_certificates=self.certs and self.certs.ca_cert)
        self._launch_superlink()
        return self.address

    def restart_superlink(self) -> None:
        """Stop the SuperLink and start it again on the same port and database; SuperNodes reconnect by themselves."""
        self._require_superlink()
        self.superlink.stop()
        self._launch_superlink()

    def _launch_superlink(self) -> None:
        command = [
            _bin("flower-superlink"), "--host", self.host, "--port", self.address.rsplit(":", 1)[1],
            "--disable-runtime-dependency-installation",
            "--database", str(self.workdir / "superlink.db"),  # a restarted SuperLink keeps its nodes and runs
        ]  # fmt: skip
        if self.certs is None:
            command.append("--insecure")
        else:
            command += [
                "--ssl-ca-certfile", str(self.certs.ca_cert), "--ssl-certfile", str(self.certs.server_cert),
                "--ssl-keyfile", str(self.certs.server_key),
            ]  # fmt: skip
            if not self.simulation:  # simulated nodes never connect, Flower only warns there
                command.append("--enable-supernode-auth")
        if self.simulation:
            command.append("--simulation")
        self._superlink_starts += 1
        log_path = self.workdir / "logs" / f"superlink-{self._superlink_starts}.log"
        self.superlink = start_process("superlink", command, log_path, self.env)
        self._wait_for_health(self.superlink)

    def register_node(self, public_key: str | Path) -> int:
        """Register a SuperNode's public key with the SuperLink (`flwr supernode register`); return its node id."""
        if not Path(public_key).is_file():
            raise FileNotFoundError(f"public key {public_key} not found; create keys with `collafuse flower certs`.")
        self._require_superlink()
        result = self._flwr(["supernode", "register", str(public_key), CONNECTION, "--format", "json"], timeout=60)
        try:
            return int(json.loads(result.stdout[result.stdout.index("{") :])["node-id"])
        except (ValueError, KeyError) as err:
            raise FlowerProcessError(
                f"`flwr supernode register {public_key}` failed (exit {result.returncode}):\n"
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
            ) from err

    def start_supernode(
        self,
        node_config: Mapping[str, ConfigValue],
        *,
        private_key: str | Path | None = None,
        wait: bool = True,
    ) -> FlowerProcess:
        """Start a SuperNode with its own runtime port and FLWR_HOME; with `wait`, block until it is connected."""
        if self.simulation:
            raise ValueError("simulation=True: simulated nodes run inside the SuperLink; start no SuperNodes.")
        if self.certs is not None and private_key is None:
            raise ValueError("private_key is None but SuperNode authentication is on; pass the node's .key file.")
        self._require_superlink()
        index = len(self.supernodes)
        home = self.workdir / "supernodes" / str(index)
        command = [
            _bin("flower-supernode"), "--superlink", self.address, "--port", str(free_port(self.host)),
        ]  # fmt: skip
        if node_config:
            command += ["--node-config", format_config(node_config)]
        if self.certs is None:
            command.append("--insecure")
        else:
            command += ["--root-certificates", str(self.certs.ca_cert)]
            command += ["--auth-supernode-private-key", str(private_key)]
        env = flower_env(home / "flwr-home")  # like a separate machine: its own FAB installs
        process = start_process(f"supernode-{index}", command, self.workdir / "logs" / f"supernode-{index}.log", env)
        self.supernodes.append(process)
        if wait:
            self.wait_for_supernode(process)
        return process

    def wait_for_supernode(self, process: FlowerProcess, timeout: float | None = None) -> int:
        """Block until the SuperNode logs its node id (it is connected and activated); return the id."""
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        while True:
            log = process.log_path.read_text(errors="replace") if process.log_path.exists() else ""
            if match := _NODE_ID_LINE.search(log):
                return int(match.group(1))
            if not process.is_running():
                raise FlowerProcessError(
                    f"{process.name} exited with code {process.popen.returncode} before connecting to the SuperLink "
                    f"at {self.address} (unregistered key? wrong CA?). Log tail:\n{process.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise FlowerProcessError(
                    f"{process.name} did not connect to {self.address} within {timeout or self.ready_timeout:.0f} s; "
                    f"raise ready_timeout if the machine is busy. Log tail:\n{process.log_tail()}"
                )
            time.sleep(_POLL_S)

    def run_app(
        self,
        app_dir: str | Path,
        *,
        run_config: Mapping[str, ConfigValue] | None = None,
        federation_config: Mapping[str, ConfigValue] | None = None,
        timeout: float = 600.0,
        check: bool = True,
        progress: Callable[[str], None] | None = None,
    ) -> FlowerRun:
        """`flwr run <app_dir> collafuse --stream` until the run ends; with `check`, raise unless it completed.

        `progress` gets each line the ServerApp prints (its per-round lines) while the run goes on.
        """
        app_dir = Path(app_dir).resolve()
        if not (app_dir / "pyproject.toml").is_file():
            raise FileNotFoundError(f"{app_dir}/pyproject.toml not found; app_dir must be a Flower app folder.")
        if federation_config and not self.simulation:
            raise ValueError("federation_config is for simulation (e.g. num-supernodes); start with simulation=True.")
        self._require_superlink()
        command = [_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        if run_config:
            command += ["--run-config", format_config(run_config)]
        if federation_config:
            command += ["--federation-config", format_config(federation_config)]
        self._runs += 1
        process = start_process(f"run-{self._runs}", command, self.workdir / "logs" / f"run-{self._runs}.log", self.env)
        start, shown = time.monotonic(), 0
        try:
            while process.popen.poll() is None:
                if time.monotonic() - start > timeout:
                    raise subprocess.TimeoutExpired(command, timeout)
                time.sleep(0.5)
                shown = _show_progress(process.log_path, shown, progress)
            _show_progress(process.log_path, shown, progress)
        except subprocess.TimeoutExpired:
            process.stop()
            raise FlowerProcessError(
                f"`flwr run {app_dir}` did not finish within {timeout:.0f} s; raise timeout or check the "
                f"ServerApp. Log tail:\n{process.log_tail()}"
            ) from None
        wall_s = time.monotonic() - start
        output = process.log_path.read_text(errors="replace")
        if not (match := _RUN_ID_LINE.search(output)):
            raise FlowerProcessError(f"`flwr run {app_dir}` did not start a run. Log tail:\n{process.log_tail()}")
        run = self._finished_run(int(match.group(1)), output, wall_s)
        # `flwr run --stream` exits 0 even when the ServerApp raised: the run status is the truth.
        if check and not run.completed:
            raise FlowerProcessError(
                f"run {run.run_id} ended as {run.status}: {run.status_details}. Log tail:\n{process.log_tail()}"
            )
        return run

    def _finished_run(self, run_id: int, output: str, wall_s: float) -> FlowerRun:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            result = self._flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], timeout=60)
            try:
                info = json.loads(result.stdout[result.stdout.index("{") :])["runs"][0]
            except (ValueError, KeyError, IndexError) as err:
                raise FlowerProcessError(
                    f"`flwr ls --run-id {run_id}` failed:\n{result.stdout}{result.stderr}"
                ) from err
            if info["status"].startswith("finished") or time.monotonic() > deadline:
                traffic = info.get("network-traffic", {})
                return FlowerRun(
                    run_id, info["status"], info.get("status-details", ""), int(traffic.get("inbound-bytes", 0)),
                    int(traffic.get("outbound-bytes", 0)), output, wall_s,
                )  # fmt: skip
            time.sleep(1.0)

    def stop(self) -> None:
        """Stop every SuperNode, then the SuperLink (each with all its descendants)."""
        for process in reversed(self.supernodes):
            process.stop()
        if self.superlink is not None:
            self.superlink.stop()

    def _require_superlink(self) -> None:
        if self.superlink is None:
            raise ValueError("the SuperLink is not started; call start_superlink() first.")

    def _flwr(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_bin("flwr"), *args], env=self.env, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def _wait_for_health(self, process: FlowerProcess) -> None:
        scheme = "http" if self.certs is None else "https"
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=self.certs.ca_cert) if self.certs else False
        deadline = time.monotonic() + self.ready_timeout
        with httpx.Client(verify=verify, timeout=1.0) as client:
            while True:
                try:
                    if client.get(f"{scheme}://{self.address}/health").is_success:
                        return
                except httpx.HTTPError:
                    pass
                if not process.is_running():
                    raise FlowerProcessError(
                        f"SuperLink exited with code {process.popen.returncode} while starting. "
                        f"Log tail:\n{process.log_tail()}"
                    )
                if time.monotonic() > deadline:
                    raise FlowerProcessError(
                        f"SuperLink at {self.address} not healthy within {self.ready_timeout:.0f} s. "
                        f"Log tail:\n{process.log_tail()}"
                    )
                time.sleep(_POLL_S)


def _bin(name: str) -> str:
    # The venv's entry point even when the venv is not activated.
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may contain spaces
            children.setdefault(ppid, []).append(int(entry))
    found, frontier = [], [pid]
    while frontier:
        kids = children.get(frontier.pop(), [])
        found += kids
        frontier += kids
    return found


def _signal_group(root: int, sig: signal.Signals) -> None:
    try:
        os.killpg(root, sig)  # the group we created with start_new_session
    except (ProcessLookupError, PermissionError):
        pass


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(pids: list[int], root: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(pid, root) for pid in pids):
        time.sleep(0.05)


def _alive(pid: int, root: subprocess.Popen) -> bool:
    if pid == root.pid:
        return root.poll() is None
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; its parent reaps it


_PROGRESS_LINE = re.compile(r"(round \d+/\d+:|refused round|sampled clients|no valid hello|claims client)")


def _show_progress(log: Path, shown: int, progress: Callable[[str], None] | None) -> int:
    """Hand the ServerApp's progress lines written to `log` since byte `shown` to `progress`; the new offset."""
    if progress is None or not log.is_file():
        return shown
    text = log.read_bytes()[shown:]
    complete = text[: text.rfind(b"\n") + 1]
    for line in complete.decode(errors="replace").splitlines():
        if _PROGRESS_LINE.search(line):
            progress(line.strip())
    return shown + len(complete)
