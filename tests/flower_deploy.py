"""Helpers for the localhost deployment test (SuperLink + SuperNodes as processes)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_of(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


class Deployment:
    """A SuperLink and SuperNodes on 127.0.0.1 (insecure: localhost only), stopped by pid."""

    def __init__(self, home: Path, env: dict):
        self.home, self.env = home, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.port = free_port()

    def start(self, name: str, args: list[str], extra_env: dict | None = None) -> subprocess.Popen:
        log = open(self.home / f"{name}.log", "w")
        p = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(extra_env or {})},
                             start_new_session=True)
        self.procs[name] = p
        return p

    def superlink(self):
        return self.start("superlink", [bin_of("flower-superlink"), "--insecure", "--port", str(self.port),
                                        "--disable-runtime-dependency-installation"])

    def supernode(self, name: str, extra_env: dict | None = None, isolation: str = "subprocess"):
        """A SuperNode; isolation "process": its SuperExec (which starts the ClientApps) is a
        process of its own, started here next to it, as on a host where they are separate services."""
        port = free_port()
        node = self.start(name, [bin_of("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                                 "--port", str(port), "--isolation", isolation], extra_env)
        if isolation == "process":
            self.start(f"{name}-superexec", [bin_of("flower-superexec"), "--insecure", "--plugin-type", "clientapp",
                                             "--runtime-api-address", f"127.0.0.1:{port}"], extra_env)
        return node

    def wait_port(self, timeout: float = 30) -> None:
        end = time.time() + timeout
        while time.time() < end:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError("SuperLink did not open its port")

    def kill(self, name: str) -> None:
        for key in (name, f"{name}-superexec"):
            p = self.procs.get(key)
            if p is not None and p.poll() is None:
                os.killpg(p.pid, 9)  # the SuperNode and the ClientApp processes it started (its own session)
                p.wait(10)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                os.killpg(p.pid, 15)
        for p in self.procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, 9)

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n" + f.read_text()[-3000:] for f in sorted(self.home.glob("*.log")))
