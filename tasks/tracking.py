"""MLflow: what happened. One parent run per pipeline run, a nested run per stage attempt, every checkpoint
as artifacts, step-wise training metrics, generators registered with a `champion` alias.

Every call names its run id explicitly (MLflow's active run is per thread; Prefect may use threads).
Default store: `sqlite:///<project>/mlflow.db` with artifacts under `<project>/mlartifacts/`;
`MLFLOW_TRACKING_URI` overrides it (e.g. the team's server from infra/mlflow.yaml).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # progress bars would garble the pipeline's

from mlflow import MlflowClient  # noqa: E402
from mlflow.data.dataset_source import DatasetSource  # noqa: E402
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

CHAMPION = "champion"
MODEL_FILE = Path(__file__).with_name("world_model.py")


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def make_client(root: Path) -> MlflowClient:
    uri = tracking_uri(root)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(client: MlflowClient, name: str, root: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    local = client.tracking_uri.startswith("sqlite:") or client.tracking_uri.startswith("file:")
    return client.create_experiment(name, artifact_location=(root / "mlartifacts" / name).as_uri() if local else None)


def start_run(client: MlflowClient, exp_id: str, name: str, tags: dict, parent_id: str | None = None) -> str:
    tags = {k: str(v) for k, v in tags.items()}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    return client.create_run(exp_id, tags=tags, run_name=name).info.run_id


def end_run(client: MlflowClient, run_id: str, ok: bool, error: str = "") -> None:
    if error:
        client.set_tag(run_id, "error", error[:5000])
    client.set_terminated(run_id, "FINISHED" if ok else "FAILED")


def log_params(client: MlflowClient, run_id: str, params: dict) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step) for k, v in metrics.items() if isinstance(v, (int, float))]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i:i + 1000])


def log_step_metrics(client: MlflowClient, run_id: str, jsonl: Path) -> int:
    """metrics.jsonl lines {"step", "split", name: value} as MLflow metrics "<split>/<name>" at their step."""
    if not jsonl.is_file():
        return 0
    now, items = int(time.time() * 1000), []
    for line in jsonl.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        step, split = int(row.pop("step")), row.pop("split", "train")
        items += [Metric(f"{split}/{k}", float(v), now, step) for k, v in row.items() if isinstance(v, (int, float))]
    for i in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[i:i + 1000])
    return len(items)


# ---- checkpoints ----------------------------------------------------------------------------------------

class CheckpointWatcher(threading.Thread):
    """Logs every `checkpoints/step-N/` of a running stage as artifacts `checkpoints/step-N`, as it appears.

    Stages keep only their newest checkpoints on disk, so each new one is first hard-linked into a staging
    folder (instant; checkpoint files are written once, never changed), then uploaded. A ledger beside the
    checkpoints (`.mlflow-checkpoints.json`: checkpoint + mtime -> run id) makes logging exactly-once across
    retries, kills and later runs."""

    def __init__(self, client: MlflowClient, run_id: str, out: Path, poll_s: float = 0.2):
        super().__init__(daemon=True, name=f"ckpt-watch-{out.name}")
        self.client, self.run_id, self.out, self.poll_s = client, run_id, out, poll_s
        self.ledger_path = out / ".mlflow-checkpoints.json"
        self.logged: list[str] = []
        self.missed: list[str] = []
        self._stop_evt = threading.Event()

    def _ledger(self) -> dict:
        try:
            return json.loads(self.ledger_path.read_text()).get(self.client.tracking_uri, {})
        except (OSError, ValueError):
            return {}

    def _record(self, key: str) -> None:
        try:
            data = json.loads(self.ledger_path.read_text())
        except (OSError, ValueError):
            data = {}
        data.setdefault(self.client.tracking_uri, {})[key] = self.run_id
        tmp = self.ledger_path.with_name(self.ledger_path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.ledger_path)

    def sweep(self) -> None:
        ckpts = self.out / "checkpoints"
        if not ckpts.is_dir():
            return
        done = self._ledger()
        for d in sorted(ckpts.glob("step-[0-9]*")):
            try:
                key = f"{d.name}@{(d / 'state.json').stat().st_mtime_ns}"
            except FileNotFoundError:  # deleted meanwhile (or not a finished checkpoint)
                continue
            if key in done:
                continue
            with tempfile.TemporaryDirectory(prefix=".ckpt-", dir=self.out) as tmp:
                try:
                    shutil.copytree(d, Path(tmp) / d.name, copy_function=os.link)
                except (FileNotFoundError, shutil.Error):
                    self.missed.append(d.name)
                    continue
                self.client.log_artifacts(self.run_id, str(Path(tmp) / d.name), f"checkpoints/{d.name}")
            self._record(key)
            self.logged.append(d.name)

    def run(self) -> None:
        while not self._stop_evt.wait(self.poll_s):
            self.sweep()

    def stop(self) -> list[str]:
        self._stop_evt.set()
        self.join()
        self.sweep()
        return self.logged


# ---- data sets ---------------------------------------------------------------------------------------------

class DvcDatasetSource(DatasetSource):
    """A file versioned by DVC: its path in the project, its DVC md5 and the git commit of the run."""

    def __init__(self, path: str, md5: str, rev: str = ""):
        self.path, self.md5, self.rev = path, md5, rev

    @staticmethod
    def _get_source_type() -> str:
        return "dvc"

    def load(self, dst_path=None) -> str:
        return self.path

    @staticmethod
    def _can_resolve(raw_source) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source) -> "DvcDatasetSource":
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"path": self.path, "md5": self.md5, "rev": self.rev, "uri": f"dvc://{self.md5}/{self.path}"}

    @classmethod
    def from_dict(cls, d: dict) -> "DvcDatasetSource":
        return cls(d["path"], d["md5"], d.get("rev", ""))


def log_jsonl_dataset(client: MlflowClient, run_id: str, root: Path, path: str, md5: str, rev: str,
                      context: str) -> None:
    """Log a JSONL data set as a run input, its DVC md5 as digest and source."""
    import mlflow.data
    import pandas as pd

    df = pd.read_json(root / path, lines=True)
    ds = mlflow.data.from_pandas(df, source=DvcDatasetSource(path, md5, rev), name=Path(path).stem,
                                 digest=md5[:16])
    client.log_inputs(run_id, [DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", context)])])


# ---- model registry ------------------------------------------------------------------------------------------

def register_generator(client: MlflowClient, name: str, run_id: str, final: Path, md5: str, score: float | None,
                       tags: dict) -> tuple[str, bool]:
    """Register a generator checkpoint folder as a version of `name` (a pyfunc model; once per DVC md5) and
    move the `champion` alias to it only if its score beats the current champion's. Returns (version, moved)."""
    import mlflow.pyfunc

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="World generators trained by the clvr pipeline "
                                                         "(pyfunc: predict(list of prompts) -> base64 PNGs).")
    known = client.search_model_versions(f"name = '{name}' and tags.dvc_md5 = '{md5}'")
    if known:
        mv = known[0]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.pyfunc.save_model(Path(tmp) / "model", python_model=str(MODEL_FILE),
                                     artifacts={"pipeline": str(final)}, pip_requirements=["clvr"])
            client.log_artifacts(run_id, str(Path(tmp) / "model"), "model")
        vtags = {**{k: str(v) for k, v in tags.items()}, "dvc_md5": md5}
        if score is not None:
            vtags["score"] = repr(float(score))
        mv = client.create_model_version(name, f"{client.get_run(run_id).info.artifact_uri}/model", run_id=run_id,
                                         tags=vtags)
    return mv.version, _maybe_promote(client, name, mv.version, score)


def _maybe_promote(client: MlflowClient, name: str, version: str, score: float | None) -> bool:
    try:
        cur = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        cur = None
    if cur is not None and cur.version == version:
        return False
    best = float(cur.tags["score"]) if cur is not None and "score" in cur.tags else None
    if cur is not None and (score is None or (best is not None and score <= best)):
        return False
    client.set_registered_model_alias(name, CHAMPION, version)
    return True


def set_tags(client: MlflowClient, run_id: str, tags: dict) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
