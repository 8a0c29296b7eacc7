"""The shipped model in use: the champion (or any registered version) labelling photo files, and served
over HTTP by `mlflow models serve`.

The model is a logged model whose pyfunc is trainers.photo_model.PhotoModel; this module finds it in
the registry, checks that it takes photos, feeds it files, and writes what it says.
"""
from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from orchestrator.results.registry import RegistryError
from orchestrator.sweep.spec_types import PromoteSpec
from trainers.errors import first_line
from trainers.photo_model import SERVE_MAX_BYTES, output_columns
from trainers.tracking import global_tracking_uri, interface_of, model_info, no_download_bars, tracking_uri

# Files read and labelled per call of the model: MTCNN detects up to 32 at once, and 64 decoded photos at
# the 896 px a 224 px model decodes to are ~150 MB.
FILES_PER_BATCH = 64


class ServingError(RegistryError):
    """No model to use, or one that cannot take photos; the message says what to do."""


@dataclass(frozen=True)
class ShippedModel:
    uri: str                     # models:/<name>@<alias> or models:/<name>/<version>
    label: str                   # what the user is told it is


def existing_store(uri: str | None) -> MlflowClient:
    """A client on the store (tracking_uri rules); a local sqlite store that does not exist is not created."""
    uri = tracking_uri(uri, create=False)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ServingError(f"no MLflow store at {uri.removeprefix('sqlite:///')}: nothing was trained or promoted "
                           "there; run `make sweep` and `make promote` first, or pass --tracking-uri")
    return MlflowClient(uri)


def shipped_model(client: MlflowClient, model: str | None, promote: PromoteSpec | None) -> ShippedModel:
    """--model (models:/name/version or models:/name@alias), else the spec's champion (promote.name @
    promote.alias); checked to take photos."""
    path = f"{promote.name}@{promote.alias}" if model is None else _registry_path(model)
    try:
        info = model_info(client, f"models:/{path}")
    except MlflowException as err:
        hint = "run `make sweep` and `make promote` first" if model is None else \
            "give --model models:/<name>/<version> or models:/<name>@<alias> of a registered model"
        raise ServingError(f"no model models:/{path} in {client.tracking_uri} ({first_line(err)}); {hint}") from None
    if interface_of(info) != "photos":
        raise ServingError(f"models:/{path} takes tensors, not photos: it was registered "
                           "before models took photos; `make promote` registers the sweep's best run again as a "
                           "photo model (`make promote ARGS=--replace` if the champion is another run)")
    return ShippedModel(f"models:/{path}", f"models:/{path} (run {info.run_id}, model {info.model_id})")


def _registry_path(model: str) -> str:
    """name/version or name@alias from models:/...; a file path is refused (nothing outside the store is loaded)."""
    if not model.startswith("models:/") or len(model) <= len("models:/"):
        raise ServingError(f"--model {model!r}: expected models:/<name>/<version> or models:/<name>@<alias> "
                           "(a registered model of this store)")
    return model[len("models:/"):]


def load_shipped(client: MlflowClient, shipped: ShippedModel):
    """The pyfunc model (trainers.photo_model.PhotoModel inside)."""
    import mlflow.pyfunc

    path = shipped.uri[len("models:/"):]
    with global_tracking_uri(client.tracking_uri), no_download_bars():
        return mlflow.pyfunc.load_model(f"models:/{path}")


# --- predict: files in, a CSV out ------------------------------------------------------------------

def photo_files(paths: list[str]) -> list[Path]:
    """The files named, and every file under the folders named (sorted; hidden files skipped)."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*")
                                if not p.is_dir() and not any(part.startswith(".") for part in p.relative_to(path).parts)))
        elif path.exists() or path.is_symlink():
            files.append(path)
        else:
            raise ServingError(f"{name}: no such file or folder; give photo files or folders holding them")
    if not files:
        raise ServingError(f"no file under {', '.join(paths)}; give photo files or folders holding them")
    return files


def read_photo(path: Path) -> bytes | str:
    """The file's bytes, or why it cannot be read: only regular files, size-checked before reading."""
    try:
        info = path.stat()
        if not path.is_file():
            return "unreadable: not a regular file"
        if info.st_size > SERVE_MAX_BYTES:
            return f"too_large: {info.st_size / 1e6:.0f} MB is over {SERVE_MAX_BYTES // 1_000_000} MB"
        return path.read_bytes()
    except OSError as err:
        return f"unreadable: {err.strerror or err}"


def predict_files(model, files: list[Path], classes: tuple[str, ...]) -> Iterator[dict]:
    """One row per file (path first, then output_columns), FILES_PER_BATCH files per call of the model."""
    columns = output_columns(classes)
    for start in range(0, len(files), FILES_PER_BATCH):
        batch = files[start:start + FILES_PER_BATCH]
        read = [read_photo(path) for path in batch]
        good = [i for i, data in enumerate(read) if isinstance(data, bytes)]
        labelled = model.predict([read[i] for i in good]).to_dict("records") if good else []
        by_index = dict(zip(good, labelled))
        for i, path in enumerate(batch):
            row = by_index.get(i) or {**dict.fromkeys(columns), "error": read[i]}
            yield {"path": str(path), **row}


def model_classes(model) -> tuple[str, ...]:
    """The classes a photo model labels with (from its output signature's p_<class> columns)."""
    outputs = model.metadata.get_output_schema().input_names()
    return tuple(name[2:] for name in outputs if name.startswith("p_"))


def write_predictions(rows: list[dict], out: Path, classes: tuple[str, ...]) -> None:
    """rows as CSV: path, label, p_<class>..., face_found, the face box, error (empty where there is none)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", *output_columns(classes)])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


# --- serve: `mlflow models serve` in place of the command that asked for it ---------------------------

def serve_command(shipped: ShippedModel, host: str, port: int) -> list[str]:
    """The `mlflow models serve` command for the model, with this environment's packages (no new env)."""
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", shipped.uri, "--env-manager", "local",
            "--host", host, "--port", str(port)]


def exec_server(command: list[str], tracking_uri: str) -> None:
    """Become the server: this process is replaced by `mlflow models serve`, so its PID is the server's
    (MLflow's uvicorn worker gets SIGTERM when that process ends, however it ends)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           # mlflow starts uvicorn by name: this environment's bin folder goes first on PATH.
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)
