"""The sweep's footprint on the machine: a read-only or full mlruns/ is one line at start; outputs land only
under mlruns/ and the folders the spec names; servers bind loopback; no file is unpickled into code."""
from __future__ import annotations

import ast
import builtins
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from orchestrator.__main__ import main as orchestrator_main
from orchestrator.sweep.spec import SWEEP_NAME, load_spec
from orchestrator.sweep.runner import WORK_DIR
from trainers.process.serve import execute, read_trial
from trainers.config import from_dict, trial_dir
from trainers.train import Checkpoint, CheckpointError

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def spec_dict(tiny_vit: dict, **extra) -> dict:
    """One tiny ViT trial on 120 synthetic 32 px faces, one epoch."""
    return {"name": "env", "data": {"source": "synthetic", "synthetic": {"n_images": 120, "draw_size": 32}},
            "models": {"vit": tiny_vit},
            "defaults": {"model": "vit", "optim": {"name": "adam", "lr": 1e-3},
                         "train": {"epochs": 1, "batch_size": 32}},
            "experiments": {"lr": {"grid": {"optim.lr": [1e-3]}}},
            "execution": {"jobs": 1, "max_retries": 0}, **extra}


def write(folder: Path, spec: dict) -> Path:
    path = folder / "spec.yaml"       # a fixed file name: the spec's own names must not pick the path
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def bare_env(home: Path, tmp: Path, **extra: str) -> dict:
    """A minimal environment: this repo importable, HOME and TMPDIR fresh, nothing else inherited
    (no MPLCONFIGDIR, no MLFLOW_TRACKING_URI, no CI or pytest variables that would hide telemetry)."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TMPDIR": str(tmp),
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **extra}


def orchestrate(cwd: Path, *args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def tree(root: Path) -> set[Path]:
    return set(root.rglob("*"))


def one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    return lines[0]


# --- 1. a read-only or full mlruns/ ---------------------------------------------------------

@pytest.fixture
def work(tmp_path, tiny_vit) -> Path:
    """tmp_path/work holding the tiny spec; HOME and TMPDIR beside it."""
    for name in ("work", "home", "tmp"):
        (tmp_path / name).mkdir()
    write(tmp_path / "work", spec_dict(tiny_vit))
    return tmp_path / "work"


def assert_nothing_created(root: Path, before: set[Path]) -> None:
    assert tree(root) == before, sorted(map(str, tree(root) - before))
    assert not list(root.rglob("*.db")), "a store was created"


@pytest.mark.parametrize("verb", ["sweep", "worker", "prepare"])
def test_mlruns_being_a_file_stops_the_verb_with_one_line_before_anything_is_created(work, verb):
    # Works as root too, unlike chmod: no user can create mlruns/optuna.db under a file.
    (work / "mlruns").write_text("not a folder")
    before = tree(work.parent)
    line = one_error_line(orchestrate(work, verb, "spec.yaml", env=bare_env(work.parent / "home",
                                                                                 work.parent / "tmp")))
    assert f"{work / 'mlruns'}" in line and "is a file, not a folder" in line and "move or rename" in line
    assert_nothing_created(work.parent, before)


def test_a_read_only_mlruns_stops_the_sweep_with_one_line_before_anything_is_created(work, read_only):
    mlruns = work / "mlruns"
    mlruns.mkdir()
    with read_only(mlruns):
        before = tree(work.parent)
        line = one_error_line(orchestrate(work, "sweep", "spec.yaml", env=bare_env(work.parent / "home",
                                                                                     work.parent / "tmp")))
        assert_nothing_created(work.parent, before)
    assert f"{mlruns}" in line and "not writable" in line and "chmod" in line


@pytest.mark.parametrize("verb", ["sweep", "prepare"])
def test_a_full_disk_stops_the_verb_with_one_line_naming_the_folder_and_its_free_space(work, verb, tiny_vit):
    cache = work.parent / "cache"
    write(work, spec_dict(tiny_vit, data={"source": "synthetic", "synthetic": {"n_images": 120, "draw_size": 32},
                                "cache_dir": str(cache)}))
    before = tree(work.parent)
    need = 10**9        # 1 PB: more than any test machine has free, so the disk reads as full
    env = bare_env(work.parent / "home", work.parent / "tmp", FER_MIN_FREE_MB=str(need))
    line = one_error_line(orchestrate(work, verb, "spec.yaml", env=env))
    # sweep names mlruns/ first; prepare writes only the data cache, so it names that
    folder = work / "mlruns" if verb == "sweep" else cache
    assert str(folder) in line, line
    free = re.search(r"has only (\d+) MB free", line)
    assert free and int(free[1]) < need and f"{need} MB" in line and "FER_MIN_FREE_MB" in line, line
    assert_nothing_created(work.parent, before)


# --- 2. outputs only under mlruns/ and the folders the spec names ---------------------------

@pytest.mark.parametrize("field, change", [
    ("name", {"name": "../escape"}),
    ("name", {"name": "runs/escape"}),
    ("experiments.../x", {"experiments": {"../x": {"grid": {"optim.lr": [1e-3]}}}}),
    ("experiments.a/b", {"experiments": {"a/b": {"grid": {"optim.lr": [1e-3]}}}}),
    ("promote.name", {"promote": {"name": "../../registry-escape"}}),
])
def test_names_that_would_become_paths_outside_mlruns_are_rejected_by_the_spec(in_tmp, capsys, field, change, tiny_vit):
    path = write(in_tmp, spec_dict(tiny_vit, **change))
    assert orchestrator_main(["sweep", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: {field} "), lines
    assert sorted(p.name for p in in_tmp.iterdir()) == ["spec.yaml"]


def test_checkpoint_and_work_folders_are_named_by_config_hash_under_their_roots(in_tmp, tiny_vit):
    """Trial names never become paths: a trial's folders are <root>/<12-hex hash>; the roots are mlruns/
    unless the spec names a folder (train.checkpoint_dir, data.cache_dir: the user's explicit choice)."""
    chosen = in_tmp / "my-checkpoints"
    default = load_spec(write(in_tmp, spec_dict(tiny_vit)))
    custom = load_spec(write(in_tmp, spec_dict(tiny_vit,
        defaults={"model": "vit", "optim": {"name": "adam", "lr": 1e-3},
                  "train": {"epochs": 1, "batch_size": 32, "checkpoint_dir": str(chosen)}})))
    for spec, root in ((default, Path("mlruns/checkpoints")), (custom, chosen)):
        for trial in spec.plan:
            folder = trial_dir(trial.config)
            assert folder.parent == root and re.fullmatch(r"[0-9a-f]{12}", folder.name), folder
    assert WORK_DIR.parts[0] == "mlruns" and SWEEP_NAME.fullmatch(default.name)
    assert from_dict({}).data.cache_dir.startswith("mlruns/")


def test_a_sweep_writes_only_under_mlruns_and_the_cache_folder_it_names(tmp_path, tiny_vit):
    work, home, tmp, cache = (tmp_path / name for name in ("work", "home", "tmp", "data-cache"))
    for folder in (work, home, tmp):
        folder.mkdir()
    # data.cache_dir outside work/ is the user's explicit choice: writing there is allowed.
    write(work, spec_dict(tiny_vit, data={"source": "synthetic", "synthetic": {"n_images": 120, "draw_size": 32},
                                "cache_dir": str(cache)}))
    before = tree(tmp_path)
    done = orchestrate(work, "sweep", "spec.yaml", env=bare_env(home, tmp))
    assert done.returncode == 0, done.stderr[-3000:]
    allowed = (work / "mlruns", cache)
    stray = sorted(str(p.relative_to(tmp_path)) for p in tree(tmp_path) - before
                   if not any(p == root or root in p.parents for root in allowed))
    assert not stray, f"written outside mlruns/ and data.cache_dir: {stray}"
    mlruns = work / "mlruns"
    assert {"mlflow.db", "optuna.db"} <= {p.name for p in mlruns.iterdir()}
    assert (mlruns / "reports" / "env" / "report.md").is_file()
    assert any(cache.rglob("*.npy")) and not (mlruns / "cache" / "synthetic").exists()
    # the default checkpoint root is under mlruns/; a finished trial removes its own folder
    assert (mlruns / "checkpoints").is_dir() and not any((mlruns / "checkpoints").iterdir())


# --- 3. servers bind loopback unless told otherwise --------------------------------------------

SERVER_COMMAND = re.compile(r"mlflow\s+(?:ui|server|models\s+serve)\b[^\n`]*")


def make_defaults(text: str) -> dict[str, str]:
    """The Makefile's `NAME ?= value` / `NAME := value` / `NAME = value` defaults."""
    return {m[1]: m[2].strip() for m in re.finditer(r"^([A-Z_]+)\s*[?:]?=\s*(.*)$", text, re.MULTILINE)}


def bound_host(command: str, variables: dict[str, str]) -> str:
    """The address a `mlflow ui|server` command binds: its --host with $(VAR) expanded, else MLflow's default."""
    from mlflow.cli import cli

    found = re.search(r"(?:^|\s)(?:--host|-h)[ =](\S+)", command)
    if found is None:
        server = cli.get_command(None, "server")
        return next(p.default for p in server.params if p.name == "host")
    value = found[1]
    return re.sub(r"\$[({](\w+)[)}]", lambda m: variables.get(m[1], ""), value)


def test_make_ui_binds_loopback_unless_the_command_line_says_otherwise():
    makefile = (REPO / "Makefile").read_text()
    variables = make_defaults(makefile)
    assert variables.get("HOST") in LOOPBACK, "make ui must bind 127.0.0.1 unless HOST=... is given"
    ui = re.search(r"^ui:.*\n((?:\t.*\n)+)", makefile, re.MULTILINE)
    assert ui and "--host $(HOST)" in ui[1], "the ui target must pass --host $(HOST)"
    if shutil.which("make") is None:
        return
    # An exported HOST (some shells and CI images set it to the machine's name) must not move the UI.
    dry_run = subprocess.run(["make", "-n", "ui"], cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "HOST": "0.0.0.0"})
    assert "mlflow ui" in dry_run.stdout and "--host 127.0.0.1" in dry_run.stdout, dry_run.stdout


def test_make_serve_and_the_serve_verb_bind_loopback_unless_the_command_line_says_otherwise():
    from orchestrator.__main__ import build_parser
    from orchestrator.results.serving import ShippedModel, serve_command

    args = build_parser().parse_args(["serve"])
    command = serve_command(ShippedModel("models:/fer-vit@champion", "champion"), args.host, args.port)
    assert command[command.index("--host") + 1] in LOOPBACK and args.port != 5000     # 5000 is make ui's
    if shutil.which("make") is None:
        return
    dry_run = subprocess.run(["make", "-n", "serve"], cwd=REPO, capture_output=True, text=True,
                             env={**os.environ, "HOST": "0.0.0.0", "PORT": "5000"})
    assert "orchestrator serve" in dry_run.stdout and "--host 127.0.0.1 --port 5001" in dry_run.stdout, \
        dry_run.stdout


def test_every_mlflow_server_command_in_the_makefile_and_readme_binds_loopback_by_default():
    # docker/compose.yaml binds 0.0.0.0 inside its container; tests/test_scaleout.py checks that the
    # published ports stay on loopback, so the compose file is not scanned here.
    variables = make_defaults((REPO / "Makefile").read_text())
    commands = [(name, c) for name in ("Makefile", "README.md")
                for c in SERVER_COMMAND.findall((REPO / name).read_text())]
    assert {name for name, _ in commands} == {"Makefile", "README.md"}, commands
    for name, command in commands:
        assert bound_host(command, variables) in LOOPBACK, f"{name}: `{command}` does not bind loopback"


SERVER_CALLS = {"bind", "listen", "serve_forever", "run_simple", "make_server"}
SERVER_NAMES = {"HTTPServer", "ThreadingHTTPServer", "TCPServer", "ThreadingTCPServer", "uvicorn", "gunicorn",
                "waitress", "flask"}


def python_files():
    for package in ("orchestrator", "trainers"):
        yield from sorted((REPO / package).rglob("*.py"))


def test_the_project_opens_no_listening_socket_of_its_own():
    """Its own processes talk over pipes (`trainers serve` reads stdin); a server added later must bind
    127.0.0.1 by default, and this test must then be extended to check it."""
    found = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            name = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr if node.func.attr in SERVER_CALLS else None
            elif isinstance(node, (ast.Name, ast.Attribute)):
                ident = node.id if isinstance(node, ast.Name) else node.attr
                name = ident if ident in SERVER_NAMES else None
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                name = next((m for m in modules if m.split(".")[0] in {"http", "socketserver", "uvicorn",
                                                                         "flask", "wsgiref"}
                             and m != "http.client"), None)
            if name:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    assert not found, found


# --- 4. models load as weights or from the registry, never by unpickling a file ------------

UNSAFE = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "dill.load", "dill.loads",
    "cloudpickle.load", "cloudpickle.loads", "joblib.load", "shelve.open", "pandas.read_pickle",
    "yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load",
    "yaml.full_load_all", "yaml.Loader", "yaml.UnsafeLoader", "yaml.FullLoader",
    "torch.jit.load", "torch.serialization.add_safe_globals", "torch.serialization.safe_globals",
}


def qualified_names(tree_: ast.Module) -> dict[str, str]:
    """Local name -> module path, from every import in the file (`import numpy as np` -> np: numpy)."""
    names = {}
    for node in ast.walk(tree_):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([names.get(node.id, node.id), *reversed(parts)])


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def is_false(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def registry_uri(node) -> bool:
    """A literal or f-string that starts with models:/ (the registry, not a path)."""
    if isinstance(node, ast.JoinedStr):
        node = node.values[0] if node.values else None
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("models:/")


def unsafe_loads(source: str, label: str) -> tuple[list[str], int, int]:
    """(problems, torch.load calls, registry load_model calls) in one Python source."""
    problems, torch_loads, registry_loads = [], 0, 0
    module = ast.parse(source, label)
    names = qualified_names(module)
    for node in ast.walk(module):
        where = f"{label}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Name, ast.Attribute)) and dotted(node, names) in UNSAFE:
            problems.append(f"{where} uses {dotted(node, names)}")
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func, names) or ""
        if name == "torch.load":
            torch_loads += 1
            if not is_true(keyword(node, "weights_only")):
                problems.append(f"{where} torch.load without weights_only=True")
        elif name == "numpy.load" and keyword(node, "allow_pickle") is not None \
                and not is_false(keyword(node, "allow_pickle")):
            problems.append(f"{where} numpy.load with allow_pickle")
        elif name.startswith("mlflow.") and name.endswith(".load_model"):
            registry_loads += 1
            if not registry_uri(node.args[0] if node.args else keyword(node, "model_uri")):
                problems.append(f"{where} {name} from something other than a models:/ registry URI")
    return problems, torch_loads, registry_loads


def test_nothing_loads_a_file_by_unpickling_it():
    problems, torch_loads, registry_loads = [], 0, 0
    for path in python_files():
        found, n_torch, n_registry = unsafe_loads(path.read_text(), str(path.relative_to(REPO)))
        problems += found
        torch_loads += n_torch
        registry_loads += n_registry
    assert not problems, problems
    # trainers/train.py (Checkpoint), trainers/models.py (ResNet-50 weights), orchestrator/production.py
    assert torch_loads >= 2 and registry_loads >= 1, "the scan no longer sees the known loads: check it"


def test_the_unpickling_scan_flags_each_unsafe_loader_and_passes_the_safe_ones():
    # Python source kept as a text file: the scanner reads it, nothing imports or runs it. Lines 3-10
    # load unsafely, lines 11-14 safely.
    source = (REPO / "tests" / "data" / "unpickling_sample.txt").read_text()
    problems, _, _ = unsafe_loads(source, "x.py")
    flagged = {int(p.split(":")[1].split()[0]) for p in problems}
    assert flagged == set(range(3, 11)), problems


class OpensAFile:
    """Pickled, it asks the unpickler to call open(marker, 'w'): code run by merely loading the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def tamper(folder: Path, marker: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 1, "model": {}, "optimizer": {}, "lr": 1e-3, "history": [],
                "payload": OpensAFile(marker)}, folder / "last.pt")
    return folder / "last.pt"


def test_a_checkpoint_holding_a_pickled_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "marker"
    path = tamper(tmp_path / "ckpt", marker)
    with pytest.raises(CheckpointError) as refused:
        Checkpoint(tmp_path / "ckpt").load()
    text = str(refused.value)
    assert str(path) in text and "io.open" in text and "Delete it" in text and "\n" not in text
    assert not marker.exists()


def test_a_trial_resuming_from_a_tampered_checkpoint_fails_with_one_line_and_no_retry(tmp_path, tiny_trial):
    raw = tiny_trial(tmp_path, data={"synthetic": {"n_images": 60, "draw_size": 32}}, train={"epochs": 1})
    config = tmp_path / "trial.yaml"
    config.write_text(yaml.safe_dump(raw))
    marker = tmp_path / "marker"
    path = tamper(trial_dir(from_dict(raw)), marker)
    result = execute(read_trial(config, []))
    assert result.status == "error" and result.retriable is False, result
    assert str(path) in result.error and "refused" in result.error, result
    assert not marker.exists()
    runs = MlflowClient(raw["tracking"]["uri"]).search_runs(
        [MlflowClient(raw["tracking"]["uri"]).get_experiment_by_name("tests").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_status_of_a_sweep_never_started_here_says_so_and_creates_nothing(in_tmp, capsys, tiny_vit):
    path = write(in_tmp, spec_dict(tiny_vit))
    assert orchestrator_main(["status", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no sweep has run from this folder"), lines
    assert "orchestrator sweep" in lines[0]
    assert sorted(p.name for p in in_tmp.iterdir()) == ["spec.yaml"]
