"""`clvr pipeline serve`: the retrain flow as a scheduled deployment, served from this machine.

Schedules need a Prefect server that runs its scheduler service. Prefect's ephemeral server (what
`clvr pipeline run` uses, and what `prefect.serve` starts when no server is configured) runs no services, so
a cron deployment served on it never fires. Here the server is either the user's (`PREFECT_API_URL`, from
the environment or the active Prefect profile) or a `prefect server start` subprocess that this module
manages: bound to 127.0.0.1, its database and log in `runs/prefect/` of the project (gitignored), in its
own session so that a Ctrl-C in the terminal reaches only `clvr pipeline serve`, which then stops things in
order: the runner first (it cancels a run in progress: SIGTERM to the flow-run process, which stops its DVC
stage process group; the run is marked Cancelled, its MLflow parent run FAILED), then the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

from clvr.errors import ClvrError
from tasks.dvc import stop_group

SERVER_DIR = Path("runs") / "prefect"  # the managed server's database and log, inside the project


def configured_api_url() -> str | None:
    """The Prefect API the user has set up (PREFECT_API_URL, or the active Prefect profile), if any."""
    from prefect.settings import get_current_settings

    url = os.environ.get("PREFECT_API_URL") or get_current_settings().api.url
    return str(url).rstrip("/") if url else None


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _die_with_parent() -> None:
    """In the server process before it starts: SIGTERM it when `clvr pipeline serve` dies, even by SIGKILL
    (Linux prctl PR_SET_PDEATHSIG; elsewhere a no-op)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@contextlib.contextmanager
def managed_server(root: Path, port: int, start_timeout_s: float = 120.0) -> Iterator[str]:
    """`prefect server start` on 127.0.0.1:`port` with its services (scheduler included), its SQLite database
    and log in `root`/runs/prefect/. Yields the API URL once /api/health answers; stops the server on exit."""
    api_url = f"http://127.0.0.1:{port}/api"
    if not _port_free(port):
        hint = (f"a Prefect server answers there: to use it, set PREFECT_API_URL={api_url}" if healthy(api_url)
                else "something else listens there")
        raise ClvrError(f"port {port} on 127.0.0.1 is in use ({hint}); or pass --port")
    folder = root / SERVER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(folder), "PREFECT_API_URL": api_url,
                "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{folder / 'prefect.db'}",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"})
    env.update({k: v for k, v in os.environ.items() if k.startswith("PREFECT_SERVER_SERVICES_")})
    log_path = folder / "server.log"
    with open(log_path, "ab") as log:
        p = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                              "--port", str(port)], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
    try:
        t0 = time.monotonic()
        while not healthy(api_url):
            if p.poll() is not None:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-5:])
                raise ClvrError(f"the Prefect server exited ({p.returncode}) before it was up; log {log_path}:\n{tail}")
            if time.monotonic() - t0 > start_timeout_s:
                raise ClvrError(f"the Prefect server did not answer on {api_url} within {start_timeout_s:.0f} s; "
                                f"log {log_path}")
            time.sleep(0.5)
        yield api_url
    finally:
        stop_group(p, grace_s=20.0)  # uvicorn and its services


@contextlib.contextmanager
def prefect_server(root: Path, port: int, log: Callable[[str], None] = print) -> Iterator[str]:
    """The user's Prefect server (PREFECT_API_URL) when one is configured, else a managed one."""
    url = configured_api_url()
    if url:
        if not healthy(url):
            raise ClvrError(f"PREFECT_API_URL={url} does not answer (GET {url}/health); start that server "
                            "or unset PREFECT_API_URL to let clvr start one")
        log(f"Prefect server: {url} (PREFECT_API_URL; schedules fire only if its scheduler service runs)")
        yield url
        return
    with managed_server(root, port) as url:
        log(f"Prefect server: UI http://127.0.0.1:{port}  API {url}  (database and log in {root / SERVER_DIR})")
        yield url


def _runner(name: str):
    """Prefect's Runner, with each flow-run process started in its own session (as Prefect's process worker
    does): a Ctrl-C in the terminal then reaches only `clvr pipeline serve`, which cancels the run through the
    runner (SIGTERM to the run's process group) instead of the run dying half-imported with a traceback."""
    from prefect.runner import Runner
    from prefect.runner._starter_engine import EngineCommandStarter

    class IsolatingRunner(Runner):
        async def __aenter__(self):
            await super().__aenter__()
            poller = self._scheduled_run_poller
            resolve = poller._resolve_starter

            def isolated(flow_run):
                starter = resolve(flow_run)
                if isinstance(starter, EngineCommandStarter):
                    starter._isolate_process_group = True
                return starter

            poller._resolve_starter = isolated
            return self

    return IsolatingRunner(name=name, pause_on_shutdown=True)


def _drain_prefect_services(timeout_s: float = 10.0) -> None:
    """Send the logs and events still queued in this process while the server is up; otherwise Prefect's
    exit hooks wait for a server that is gone."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        service.drain_all(timeout=timeout_s)


async def _serve(deployment, log: Callable[[str], None]) -> None:
    runner = _runner(f"clvr-{deployment.name}")
    await runner.aadd_deployment(deployment)
    stopping: list[asyncio.Task] = []

    def stop(signame: str) -> None:
        if stopping or not runner.started:
            return
        log(f"{signame}: stopping the runner (a run in progress is cancelled), then the server")
        stopping.append(asyncio.ensure_future(runner.astop()))

    async def install_handlers() -> None:
        while not runner.started:  # Runner.start installs its own SIGTERM handler first; replace it
            await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop, sig.name)

    handlers = asyncio.create_task(install_handlers())
    try:
        await runner.start()
    finally:
        handlers.cancel()


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt


def serve(root: Path, deployment, when: str, port: int = 4200, log: Callable[[str], None] = print) -> None:
    """Serve `deployment` (flows.retrain.local_deployment) until SIGINT/SIGTERM; then stop cleanly."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Until the runner is up, a signal just ends this process; the server's finally-block still stops it.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with prefect_server(root, port, log) as url:
            os.environ["PREFECT_API_URL"] = url  # the flow-run processes the runner starts talk to it too
            with temporary_settings(updates={PREFECT_API_URL: url}):
                log(f"serving deployment 'retrain/{deployment.name}', {when}, from {root}; Ctrl-C or SIGTERM stops it")
                try:
                    asyncio.run(_serve(deployment, log))
                finally:
                    _drain_prefect_services()
    except KeyboardInterrupt:
        pass
    log("stopped")
