"""A spec that attacks the planner: a YAML alias bomb, a huge grid, a value no trial can run with, a long
value in an error, Ctrl-C mid-plan. Each ends at once in one line (exit 2, or 130 for Ctrl-C), never in a
traceback, a stall or gigabytes of memory."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.__main__ import main
from orchestrator.sweep.spec import SpecError, spec_from_dict

# The plan command peaks at ~150 MB of address space (numpy, PyYAML, no torch). Printing the alias bomb
# below whole takes 3.6 GB, and expanding a 10^6-point grid grows past that within a minute: under 1.5 GB
# either fails fast instead of taking the machine's memory.
MEMORY_CAP = 1536 * 2**20


def capped_child() -> None:
    """A plan child: at most MEMORY_CAP of address space, and Ctrl-C's default action (a shell that starts
    a job in the background passes SIGINT on ignored, and Python then never raises KeyboardInterrupt)."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_plan(folder: Path, spec: Path, clean_env) -> subprocess.Popen:
    """`python -m orchestrator plan spec` in folder under capped_child; one BLAS thread, whose buffers would
    otherwise take address space per core."""
    env = {**clean_env(), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "orchestrator", "plan", str(spec)], cwd=folder, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=capped_child)


def run_plan(folder: Path, spec: Path, clean_env) -> tuple[int, str]:
    """start_plan to its end (at most a minute): its exit status and stderr."""
    child = start_plan(folder, spec, clean_env)
    try:
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    return child.returncode, err


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """A flow list whose aliases expand it to width**levels strings (9^9 ~ 3.9e8) in ~400 bytes of YAML."""
    value = "&l0 [" + ", ".join(["lol"] * width) + "]"
    for k in range(1, levels):
        value = f"&l{k} [{value}, " + ", ".join([f"*l{k - 1}"] * (width - 1)) + "]"
    return value


def small_spec(grid_spec, folder: Path, **changes) -> dict:
    """demo.yaml's data, models and defaults with a one-point grid, as a dict; changes replace top-level keys."""
    spec = yaml.safe_load(grid_spec(folder, 1, 1, 1).read_text())
    return {**spec, **changes}


def write(folder: Path, spec: dict | str) -> Path:
    path = folder / "spec.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.mark.parametrize("field", ["name", "seeds", "description"])
def test_an_alias_bomb_in_a_checked_field_is_refused_in_one_line_without_the_memory_it_stands_for(
        tmp_path, grid_spec, clean_env, field):
    text = yaml.safe_dump(small_spec(grid_spec, tmp_path), sort_keys=False)
    text = text.replace("name: grid\n", "") if field == "name" else text
    path = write(tmp_path, f"{text}{field}: {alias_bomb()}\n")
    assert path.stat().st_size < 2000
    code, err = run_plan(tmp_path, path, clean_env)
    assert code == 2, err[-2000:]
    (line,) = err.splitlines()
    assert line.startswith(f"error: {path}: is refused at line ") and "more than 1,000,000 values" in line


def test_a_million_point_grid_is_refused_at_once_with_its_count(tmp_path, grid_spec, clean_env):
    code, err = run_plan(tmp_path, grid_spec(tmp_path, 100, 100, 100), clean_env)
    assert code == 2, err[-2000:]
    (line,) = err.splitlines()
    assert "experiments make 1,000,000 trials (grid points x seeds), more than execution.max_trials " \
           "allows (10,000)" in line


def test_raising_execution_max_trials_lets_a_larger_plan_through(tmp_path, grid_spec):
    spec = yaml.safe_load(grid_spec(tmp_path, 101, 10, 10).read_text())       # 10,100 points
    with pytest.raises(SpecError, match=r"experiments make 10,100 trials .* \(10,000\)"):
        spec_from_dict(spec, "spec.yaml")
    spec["execution"] = {"max_trials": 20_000}
    assert len(spec_from_dict(spec, "spec.yaml").plan) == 10_100
    spec["execution"] = {"max_trials": 0}
    with pytest.raises(SpecError, match=r"execution\.max_trials must be an integer >= 1; got int 0"):
        spec_from_dict(spec, "spec.yaml")


@pytest.mark.parametrize("change, words", [
    ({"seeds": [0, -1]}, "seeds[1] must be a seed from 0 to 2^64 - 1 (numpy and torch refuse others); got -1"),
    ({"data": {"split_seed": -1}}, "data.split_seed must be a seed from 0 to 2^64 - 1"),
    ({"data": {"synthetic": {"seed": 2**64}}}, "data.synthetic.seed must be a seed from 0 to 2^64 - 1"),
    ({"models": {"vit": {"name": "vit", "image_size": 100_000}}},
     "models.vit.image_size must be 16 to 1024 pixels, as each image takes size x size x 3 bytes"),
])
def test_a_seed_or_image_size_no_trial_can_run_with_is_refused_by_plan_in_one_line(
        tmp_path, grid_spec, capsys, change, words):
    path = write(tmp_path, small_spec(grid_spec, tmp_path, **change))
    assert main(["plan", str(path)]) == 2
    out, err = capsys.readouterr()
    (line,) = err.splitlines()
    assert out == "" and line.startswith(f"error: {path}: {words}"), line


@pytest.mark.parametrize("change, field", [
    ({"name": "not a name " + "x" * 5000}, "name must use only a-z"),
    ({"defaults": {"model": "vit", "optim": {"name": "adamw" * 2000}}}, "defaults.optim.name must be one of"),
    ({"experiments": {"e": {"grid": {"data.classes": [[f"class{i}" for i in range(10_000)]],
                                      "data.source": ["imagefolder"]}}}},
     "data.root (from experiments.e at data.classes=['class0', 'class1', "),
])
def test_an_error_shows_at_most_200_characters_of_a_long_value(tmp_path, grid_spec, change, field):
    with pytest.raises(SpecError) as caught:
        spec_from_dict(small_spec(grid_spec, tmp_path, **change), "spec.yaml")
    message = str(caught.value)
    assert field in message and len(message) < 500, message[:1000]


def test_ctrl_c_while_planning_is_one_line_and_exit_130(tmp_path, grid_spec, clean_env):
    spec = yaml.safe_load(grid_spec(tmp_path, 100, 100, 10).read_text())
    # 3 x 10^5 points take ~5 s to plan and seconds more to list; the first progress line comes at 10%.
    spec.update(seeds=[0, 1, 2], execution={"max_trials": 300_000})
    child = start_plan(tmp_path, write(tmp_path, spec), clean_env)
    try:
        first = child.stderr.readline()
        assert first.startswith("planning grid points: "), first + child.stderr.read()[-2000:]
        os.kill(child.pid, signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 130, err[-2000:]
    said = [line for line in err.splitlines() if line and not line.startswith("planning grid points: ")]
    assert said == ["interrupted"] and out == ""
