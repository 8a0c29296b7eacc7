"""The messages a trainer process exchanges over its stdin/stdout pipe: one JSON object a line.

executor -> trainer (`python -m trainers serve`):  run (a trial's whole config, its log, the attempt, the
                                                   claim), stop (end the trial after its current epoch),
                                                   verdict (the answer to finishing)
trainer -> executor:  started (the trial's MLflow run is open), epoch (one finished epoch's metrics),
                      finishing (the trial ended: may its run be closed with this status?),
                      done (how the trial ended)

A claimed trial ends in two steps, so that a worker whose claim was taken over (its heartbeats stopped,
another worker re-queued the trial) never closes a second run as FINISHED: the trainer logs everything,
sends `finishing`, and closes its run as the `verdict` says, FINISHED when the ledger recorded the result
under this claim, KILLED (status superseded) when the claim is no longer the trial's.
trainer -> figure helper: figures (draw a run's figures and log them); helper -> trainer: figures_done

Every line carries the protocol version; `decode` refuses another version, or a line that is not a
message, with ProtocolError naming what it got.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import ClassVar, Union

VERSION = 2


class ProtocolError(ValueError):
    """A line that is not a message of this protocol version (garbled, unknown, or from other code)."""


@dataclass(frozen=True)
class Run:
    """Run one trial: `config` is the serialised TrialConfig (trainers.config.to_dict)."""
    kind: ClassVar[str] = "run"
    config: dict
    log: str                      # the trial's log file: the trainer's own output goes there
    attempt: int = 0              # 0 for the first attempt, n for the n-th retry
    worker: str = ""              # host/slot, for the attempt's header line in the log
    claim: str = ""               # the ledger claim's token; when set, the trainer asks (finishing) before
                                  # closing its run; empty: it closes it on its own (no ledger behind it)


@dataclass(frozen=True)
class Stop:
    """End the running trial after its current epoch, as pruned (e.g. by the median rule)."""
    kind: ClassVar[str] = "stop"
    reason: str


@dataclass(frozen=True)
class Started:
    """The trial's MLflow run is open (a retry resumes the same run)."""
    kind: ClassVar[str] = "started"
    run_id: str


@dataclass(frozen=True)
class Finishing:
    """The trial ended with `status` (finished / diverged / pruned), all logged but its run still open."""
    kind: ClassVar[str] = "finishing"
    claim: str                    # the token of the `run` it answers
    status: str
    run_id: str
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """The answer to `finishing`: kept, the ledger recorded the result (close the run with its status);
    not kept, the claim was taken over or the sweep is stopping (close it KILLED)."""
    kind: ClassVar[str] = "verdict"
    kept: bool


@dataclass(frozen=True)
class Epoch:
    """One finished epoch and its metrics (train_loss, val_loss, val_macro_f1, lr, epoch_seconds, ...)."""
    kind: ClassVar[str] = "epoch"
    epoch: int
    epochs: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class Done:
    """How the trial ended: finished / diverged / pruned; superseded (its verdict said not kept); or error
    (retriable or not) with its message; disk_full when the error was a full disk (the run is closed KILLED:
    the sweep hands the trial back without using a retry and stops, since every next trial would fail too)."""
    kind: ClassVar[str] = "done"
    status: str
    run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0    # inside epochs
    wall_seconds: float = 0.0     # the whole trial in the trainer: data, model, training, logging
    error: str = ""
    retriable: bool = False
    disk_full: bool = False


@dataclass(frozen=True)
class FigureJob:
    """Draw a run's training curves and confusion matrix and log them as PNGs."""
    kind: ClassVar[str] = "figures"
    uri: str
    run_id: str
    cwd: str                      # the trainer's folder: a relative store path means this one
    title: str
    history: list[dict]
    classes: list[str]
    confusion: list[list[int]] | None
    log: str | None = None        # the trial's log: the helper's messages for this job go there
    id: int = 0                   # set by the sender; its answer carries the same


@dataclass(frozen=True)
class FiguresDone:
    """The figure helper's answer to job `id`: error is empty when both figures were logged."""
    kind: ClassVar[str] = "figures_done"
    id: int
    error: str = ""


Message = Union[Run, Stop, Verdict, Started, Epoch, Finishing, Done, FigureJob, FiguresDone]
MESSAGES: dict[str, type] = {cls.kind: cls for cls in (Run, Stop, Verdict, Started, Epoch, Finishing, Done, FigureJob,
                                                       FiguresDone)}


def encode(message: Message) -> str:
    """One line: {"protocol": VERSION, "type": kind, ...the message's fields}."""
    return json.dumps({"protocol": VERSION, "type": message.kind, **dataclasses.asdict(message)}) + "\n"


def decode(line: str) -> Message:
    """The message on one line; ProtocolError if it is not one of this version."""
    try:
        data = json.loads(line)
    except ValueError:
        raise ProtocolError(f"not a protocol message: {line.strip()[:200]!r}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"not a protocol message: {line.strip()[:200]!r}")
    version = data.pop("protocol", None)
    if version != VERSION:
        raise ProtocolError(f"protocol version {version!r} where {VERSION} was expected: the executor and "
                            "the trainer come from different versions of this code")
    kind = data.pop("type", None)
    if kind not in MESSAGES:
        raise ProtocolError(f"unknown message type {kind!r}")
    try:
        return MESSAGES[kind](**data)
    except TypeError as err:     # a field missing or unknown
        raise ProtocolError(f"bad '{kind}' message: {err}") from None
