"""The trainer protocol: every message survives a round trip, a line from another version or a garbled
line is refused with a clear error, and a real `python -m trainers serve` speaks it over its pipe."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from trainers.config import from_dict, to_dict
from trainers.process.protocol import (VERSION, Done, Epoch, FigureJob, FiguresDone, ProtocolError, Run, Started,
                                       Stop, decode, encode)

REPO = Path(__file__).resolve().parents[1]

EVERY_MESSAGE = [
    Run({"model": {"name": "vit"}, "train": {"epochs": 2}}, "/tmp/log.txt", 1, "host/cpu0"),
    Stop("pruned by the median rule"),
    Started("0123abcd"),
    Epoch(2, 3, {"train_loss": 1.5, "val_macro_f1": 0.25, "lr": 1e-3}),
    Done("finished", "0123abcd", {"val_macro_f1": 0.5, "test_macro_f1": 0.4}, 12.5, 14.0),
    Done("error", error="out of memory", retriable=True),
    FigureJob("sqlite:///x.db", "0123abcd", "/work", "vit-adam", [{"epoch": 1, "train_loss": 1.0}],
              ["anger", "fear"], [[1, 0], [2, 3]], "/tmp/log.txt", 7),
    FiguresDone(7, "figures: ValueError: bad"),
]


@pytest.mark.parametrize("message", EVERY_MESSAGE, ids=lambda m: m.kind)
def test_every_message_survives_a_round_trip_as_one_json_line(message):
    line = encode(message)
    assert line.endswith("\n") and line.count("\n") == 1
    assert json.loads(line)["protocol"] == VERSION and json.loads(line)["type"] == message.kind
    assert decode(line) == message


def test_a_trial_config_crosses_the_pipe_whole(tmp_path, tiny_trial):
    cfg = from_dict(tiny_trial(tmp_path, tracking={"run_name": "r", "tags": {"role": "trial"}}))
    assert from_dict(decode(encode(Run(to_dict(cfg), "log.txt"))).config) == cfg


def test_a_message_from_another_protocol_version_is_refused_naming_both_versions():
    line = json.dumps({"protocol": VERSION + 1, "type": "stop", "reason": "x"})
    with pytest.raises(ProtocolError, match=f"version {VERSION + 1} where {VERSION} was expected"):
        decode(line)
    with pytest.raises(ProtocolError, match="version None"):
        decode(json.dumps({"type": "stop", "reason": "x"}))


@pytest.mark.parametrize("line", ["epoch 1/3 train_loss 0.9", '{"protocol": 1, "type": "sto', "[1, 2]", ""])
def test_a_garbled_line_is_refused_quoting_it(line):
    with pytest.raises(ProtocolError, match="not a protocol message"):
        decode(line)


def test_an_unknown_type_or_a_missing_field_is_refused():
    with pytest.raises(ProtocolError, match="unknown message type 'pause'"):
        decode(json.dumps({"protocol": VERSION, "type": "pause"}))
    with pytest.raises(ProtocolError, match="bad 'started' message"):
        decode(json.dumps({"protocol": VERSION, "type": "started"}))
    with pytest.raises(ProtocolError, match="bad 'stop' message"):
        decode(json.dumps({"protocol": VERSION, "type": "stop", "reason": "x", "when": 3}))


# --- a real trainer process ------------------------------------------------------------------------

def start_trainer(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "trainers", "serve"], cwd=folder, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def send(trainer: subprocess.Popen, message) -> None:
    trainer.stdin.write(encode(message))
    trainer.stdin.flush()


def receive(trainer: subprocess.Popen, timeout: float = 180):
    ready, _, _ = select.select([trainer.stdout], [], [], timeout)
    assert ready, "the trainer did not answer"
    return decode(trainer.stdout.readline())


def test_a_trainer_reports_its_run_and_epochs_and_stops_when_told(tmp_path, tiny_trial):
    cfg = from_dict(tiny_trial(tmp_path, train={"epochs": 5}))
    log = tmp_path / "log.txt"
    trainer = start_trainer(tmp_path)
    try:
        send(trainer, Run(to_dict(cfg), str(log), 0, "here/cpu0"))
        started = receive(trainer)
        assert isinstance(started, Started) and started.run_id
        first = receive(trainer)
        assert isinstance(first, Epoch) and (first.epoch, first.epochs) == (1, 5)
        assert 0.0 <= first.metrics["val_macro_f1"] <= 1.0
        send(trainer, Stop("pruned by the median rule"))
        epochs = [first.epoch]
        while isinstance(answer := receive(trainer), Epoch):
            epochs.append(answer.epoch)
        assert isinstance(answer, Done) and answer.status == "pruned" and answer.run_id == started.run_id
        assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) < 5
        text = log.read_text()
        assert "--- attempt 1 on here/cpu0" in text and "epoch 1/5" in text     # the trainer's output went there
        assert '"protocol"' not in text
    finally:
        trainer.stdin.close()
        assert trainer.wait(timeout=60) == 0


def test_a_trainer_answers_a_garbled_request_with_an_error_that_is_not_retried(tmp_path):
    trainer = start_trainer(tmp_path)
    trainer.stdin.write('{"protocol": 0, "type": "run"}\n')
    trainer.stdin.flush()
    answer = receive(trainer)
    assert isinstance(answer, Done) and answer.status == "error" and answer.retriable is False
    assert "version 0" in answer.error
    assert trainer.wait(timeout=60) == 2
