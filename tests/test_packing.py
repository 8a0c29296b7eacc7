"""Several trials on one GPU (execution.trials_per_gpu): the slots the executor makes, what their trainers may
take of the card, and how the spec and the command line set it. CI has no GPU: GPU indices are stand-ins
(nothing here touches a card), and the trainer's side is checked on the numbers it decides from."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.__main__ import main
from orchestrator.sweep.executor import make_slots
from orchestrator.sweep.spec import SpecError, load_spec
from trainers.errors import UserError
from trainers.process.gpu_share import GPU_SHARE_ENV, gpu_share, memory_fraction, resident_budget

REPO = Path(__file__).resolve().parents[1]
GB = 2**30


def demo_with(tmp_path: Path, **execution) -> Path:
    """sweeps/demo.yaml with its execution section changed (a value None removes the key)."""
    raw = yaml.safe_load((REPO / "sweeps" / "demo.yaml").read_text())
    raw["execution"] = {k: v for k, v in {**raw["execution"], **execution}.items() if v is not None}
    path = tmp_path / "packed.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_each_gpu_gets_n_slots_pinned_to_it_with_a_1_in_n_share_and_a_split_of_the_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    slots = make_slots([0, 3], None, per_gpu=2)
    assert [s.name for s in slots] == ["gpu0.0", "gpu0.1", "gpu3.0", "gpu3.1"]     # the live table tells them apart
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "0", "3", "3"]
    assert {s.env[GPU_SHARE_ENV] for s in slots} == {"2"}
    # 16 cores over 4 slots: each trainer's torch and its math libraries take 4 threads, not all 16.
    assert {s.threads for s in slots} == {4}
    assert {(s.env["OMP_NUM_THREADS"], s.env["MKL_NUM_THREADS"]) for s in slots} == {("4", "4")}


def test_one_trial_per_gpu_keeps_the_gpu_names_and_gives_the_card_whole(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    slots = make_slots([0, 1], None)
    assert [(s.name, s.env["CUDA_VISIBLE_DEVICES"], s.env[GPU_SHARE_ENV], s.threads) for s in slots] == \
        [("gpu0", "0", "1", 8), ("gpu1", "1", "1", 8)]


def test_on_cpu_jobs_rule_and_trials_per_gpu_is_ignored(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")      # no GPU visible
    assert [(s.name, s.threads) for s in make_slots(None, 2, per_gpu=4)] == [("cpu0", 2), ("cpu1", 2)]
    only = make_slots(None, None, per_gpu=4)
    assert [s.name for s in only] == ["cpu0"] and GPU_SHARE_ENV not in only[0].env
    assert only[0].env["CUDA_VISIBLE_DEVICES"] == ""


def test_a_slots_trainer_process_reads_the_share_its_slot_sets():
    slot = make_slots([0], None, per_gpu=3)[1]
    done = subprocess.run([sys.executable, "-c", "from trainers.process.gpu_share import gpu_share; print(gpu_share())"],
                          env={**os.environ, **slot.env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert done.stdout.strip() == "3", done.stderr


def test_the_resident_set_is_sized_from_the_slots_share_of_the_card_not_the_whole_card():
    set_bytes = 10 * GB
    # Alone on an idle 80 GB card, a 10 GB set fits its quarter of the free memory, as before packing.
    assert resident_budget(80 * GB, 80 * GB, 1) == 20 * GB >= set_bytes
    # One of four slots may take a quarter of its 20 GB share: the set stays on the host, and the card stays
    # free for the other three even though the first trainer to start sees it all free.
    assert resident_budget(80 * GB, 80 * GB, 4) == 5 * GB < set_bytes
    # A card the others already filled: the free memory is the tighter bound.
    assert resident_budget(8 * GB, 80 * GB, 4) == 2 * GB


def test_the_allocator_is_capped_below_an_even_share_only_when_the_card_is_shared():
    assert memory_fraction(1) is None
    assert memory_fraction(4) == pytest.approx(0.95 / 4)
    assert 4 * memory_fraction(4) < 1.0      # room left for the four processes' CUDA contexts


def test_a_malformed_share_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.delenv(GPU_SHARE_ENV, raising=False)
    assert gpu_share() == 1
    monkeypatch.setenv(GPU_SHARE_ENV, "two")
    with pytest.raises(UserError, match=rf"^{GPU_SHARE_ENV}='two': set it to the number of trainers") as caught:
        gpu_share()
    assert "\n" not in str(caught.value)


def test_a_spec_with_trials_per_gpu_plans(tmp_path, capsys):
    path = demo_with(tmp_path, trials_per_gpu=4)
    assert load_spec(path).execution.trials_per_gpu == 4
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "estimated cost: 18 trials" in out
    assert load_spec(demo_with(tmp_path, trials_per_gpu=None)).execution.trials_per_gpu == 1      # the default


@pytest.mark.parametrize("value", [0, 65, "two", True, 1.5])
def test_a_bad_trials_per_gpu_is_refused_in_one_line(tmp_path, value):
    path = demo_with(tmp_path, trials_per_gpu=value)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: execution.trials_per_gpu must be an integer from 1 to 64"), message
    assert "\n" not in message


@pytest.mark.parametrize("args, words", [
    (["--jobs", "2", "--gpus", "0"], "--jobs: runs trials on the CPU, --gpus on GPUs: give one of them"),
    (["--jobs", "2", "--trials-per-gpu", "2"], "--jobs: runs trials on the CPU, --trials-per-gpu on GPUs"),
    (["--trials-per-gpu", "0"], "--trials-per-gpu: must be from 1 to 64; got 0"),
])
def test_contradicting_slot_options_exit_2_in_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys,
                                                                                 args, words):
    path = demo_with(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(path), *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {words}"), lines
    assert [p.name for p in tmp_path.iterdir()] == [path.name]      # no mlruns/: no store, no run
