"""Run the cached ComfyUI 0.30.0 as a real server (tests, docs' example workflow) and talk to it over HTTP.

The server runs from the cache made by :func:`comfyquant.testing.comfyui_env.ensure_comfyui` but writes nothing
there: ``--base-directory`` points at a folder of the caller's (models, custom_nodes, input, output, user),
the database lives in memory and the web frontend is a one-page stub (the frontend package is not needed to
run workflows). comfy-kitchen 0.2.40 comes from the cache's ``site/`` folder on ``PYTHONPATH``; torchvision and
torchaudio, which have no CPU build here, get the raising stand-ins of ``comfyui_env`` through a
``sitecustomize.py``. ComfyUI's other requirements must be installed in the Python that runs it (the ``test``
extra of pyproject.toml).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from comfyquant.testing.comfyui_env import comfyui_dir, kitchen_dir

SITECUSTOMIZE = """\
# Written by comfyquant.testing.comfyui_server: raising stand-ins for torchvision/torchaudio (no CPU build here).
from comfyquant.testing.comfyui_env import install_standins
from comfyquant.testing.site_chain import run_next

install_standins()
run_next(__file__)  # a sitecustomize later on PYTHONPATH (the test suite's) runs too
"""
REQUIRED_MODULES = ("aiohttp", "yarl", "torchsde", "sqlalchemy", "alembic", "av", "simpleeval", "blake3")


class ServerError(RuntimeError):
    """The server did not start, died, or a workflow could not be run (message includes the log tail)."""


def missing_requirements(python: str = sys.executable) -> list[str]:
    """Modules the server imports that ``python`` lacks (empty: it can run ComfyUI)."""
    code = ("import importlib.util, sys; print(','.join(m for m in sys.argv[1:] "
            "if importlib.util.find_spec(m) is None))")
    out = subprocess.run([python, "-c", code, *REQUIRED_MODULES], capture_output=True, text=True, check=True)
    return [m for m in out.stdout.strip().split(",") if m]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare_base(base: Path) -> Path:
    """Create the server's base folder (custom_nodes, models/diffusion_models, models/loras, ...)."""
    for sub in ("custom_nodes", "models/diffusion_models", "models/loras", "input", "output", "user", ".stub"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / ".stub" / "index.html").write_text("<!doctype html><title>ComfyUI (no frontend)</title>\n")
    (base / ".stub" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return base


class ComfyServer:
    """One ComfyUI server process on 127.0.0.1; ``start`` / ``run(workflow)`` / ``stop``."""

    def __init__(self, cache_root: Path, base: Path, *, python: str = sys.executable, port: int | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.cache_root, self.base = Path(cache_root), prepare_base(Path(base))
        self.python, self.port = python, port or free_port()
        self.extra_args = extra_args
        self.log_path = self.base / "server.log"
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    def command(self) -> list[str]:
        return [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--base-directory", str(self.base), "--front-end-root", str(self.base / ".stub"),
                "--database-url", "sqlite:///:memory:", "--disable-auto-launch", *self.extra_args]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(self.base / ".stub"), str(kitchen_dir(self.cache_root))]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    # ---- process ---------------------------------------------------------------------------------------
    def start(self, timeout: float = 600.0) -> ComfyServer:
        """Start the server and wait until ``/system_stats`` answers (ServerError with the log if it does not).

        Startup takes ~15 s on an idle 2-core machine; importing all of ComfyUI took over 240 s on one shared by
        a dozen busy processes, hence the generous limit (the wait ends as soon as the server answers)."""
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.command(), cwd=comfyui_dir(self.cache_root), env=self.env(),
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with status {self.proc.returncode} while starting\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (OSError, ServerError):
                time.sleep(0.5)
        self.stop()
        raise ServerError(f"ComfyUI did not answer within {timeout:.0f} s\n{self.log_tail()}")

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 15 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "--- ComfyUI log (tail) ---\n" + "\n".join(self.log_text().splitlines()[-lines:])

    # ---- HTTP ------------------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        with urllib.request.urlopen(self.url(path), timeout=timeout) as r:
            return json.loads(r.read())

    def post_json(self, path: str, body: Any, timeout: float = 30.0) -> tuple[int, Any]:
        req = urllib.request.Request(self.url(path), data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def object_info(self, node: str) -> dict[str, Any]:
        return self.get_json(f"/object_info/{node}").get(node, {})

    def queue(self, workflow: dict[str, Any]) -> tuple[int, Any]:
        """POST an API-format workflow to ``/prompt``: (HTTP status, JSON answer)."""
        return self.post_json("/prompt", {"prompt": workflow, "client_id": self.client_id})

    def wait(self, prompt_id: str, timeout: float = 180.0) -> dict[str, Any]:
        """Poll ``/history/<id>`` until the prompt finished (success or error); its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and \
                    entry["status"].get("status_str") in ("success", "error"):
                return entry
            if not self.alive():
                raise ServerError(f"ComfyUI died while running prompt {prompt_id}\n{self.log_tail()}")
            time.sleep(0.2)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s\n{self.log_tail()}")

    def run(self, workflow: dict[str, Any], timeout: float = 180.0) -> dict[str, Any]:
        """Queue a workflow and wait for it; ServerError (with the log) if the server refused it."""
        status, answer = self.queue(workflow)
        if status != 200:
            raise ServerError(f"/prompt refused the workflow ({status}): {json.dumps(answer)[:2000]}")
        return self.wait(answer["prompt_id"], timeout)


def execution_error(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The ``execution_error`` message of a history entry (None when the prompt succeeded)."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def node_text(entry: dict[str, Any], node_id: str) -> list[str]:
    """The ``ui.text`` lines a node returned in a history entry."""
    return list(entry.get("outputs", {}).get(node_id, {}).get("text", []))
