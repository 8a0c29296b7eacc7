"""Live sweep progress: a rich table on a terminal, one line per finished trial otherwise."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from orchestrator.sweep.executor import Executor
from orchestrator.sweep.ledger import Ledger

COLOURS = {"finished": "green", "diverged": "yellow", "pruned": "cyan", "failed": "red", "retried": "magenta",
           "released": "blue"}


@dataclass(frozen=True)
class Running:
    """A running trial as the ETA sees it."""
    elapsed: float
    epoch: int                    # epochs finished
    epochs: int
    cost: float                   # FLOPs per dataset image (plan.trial_flop)
    resumed_at: int = 0           # epochs a checkpoint had done before this attempt began


def remaining_seconds(trial: Running, seconds_per_flop: float | None) -> float | None:
    """A running trial's time left: from its own pace once it has finished an epoch, else from its cost at
    the pace of the trials done so far; None when neither is known."""
    ran = trial.epoch - trial.resumed_at          # epochs this attempt has done
    if ran > 0:
        return trial.elapsed / ran * (trial.epochs - trial.epoch)
    if seconds_per_flop is not None and trial.cost > 0:
        left = 1 - trial.resumed_at / max(trial.epochs, 1)
        return max(trial.cost * seconds_per_flop * left - trial.elapsed, 0.0)
    return None


def eta_seconds(done: list[tuple[float, float]], running: list[Running], left: int, slots: int) -> float | None:
    """Time until the sweep ends: the running trials' time left (remaining_seconds) plus the mean time of the
    trials finished (seconds, cost: only those that ran every epoch) for each one still waiting, shared
    over the slots, and never less than the longest running trial's time left (a ResNet-50 trial in its
    first epoch holds the end back)."""
    timed = [(s, c) for s, c in done if s > 0]
    costed = [(s, c) for s, c in timed if c > 0]
    seconds_per_flop = sum(s for s, _ in costed) / sum(c for _, c in costed) if costed else None
    mean = sum(s for s, _ in timed) / len(timed) if timed else None
    lefts = [remaining_seconds(r, seconds_per_flop) for r in running]
    if None in lefts or (left and mean is None):
        return None
    queued = left * mean if left else 0.0
    return max((sum(lefts) + queued) / max(slots, 1), max(lefts, default=0.0))


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class LiveProgress:
    """Shows done / running / failed / left, each slot's trial and epoch, recent results and the ETA."""

    def __init__(self, executor: Executor, ledger: Ledger):
        self.executor, self.ledger = executor, ledger
        self.console = Console(stderr=True)
        self.tty = sys.stderr.isatty()
        self.printed = 0
        self.counts: dict = {}
        self.last_count = 0.0
        self.live = Live(console=self.console, refresh_per_second=2, transient=False) if self.tty else None
        if self.live:
            self.live.start()

    def until(self, running) -> None:
        """Refresh until running() is False."""
        while running():
            self.refresh()
            time.sleep(0.5)
        self.refresh()

    def refresh(self) -> None:
        now = time.monotonic()
        if now - self.last_count > 2 or not self.counts:
            with self.executor.ledger_lock:
                self.counts = dict(self.ledger.counts())
            self.last_count = now
        if self.live:
            self.live.update(self.render())
        else:
            self.print_new_events()

    def summary(self) -> str:
        c = self.counts
        done = sum(v for k, v in c.items() if k not in ("waiting", "running", "failed"))
        timed = [(e.seconds, e.cost) for e in self.executor.progress.events if e.status == "finished"]
        now = time.monotonic()
        running = [Running(now - s.started, s.epoch, s.epochs, s.cost, s.resumed_at or 0)
                   for s in self.executor.progress.slots.values() if s.trial]
        eta = eta_seconds(timed, running, c.get("waiting", 0), len(self.executor.slots))
        return (f"done {done} · running {c.get('running', 0)} · failed {c.get('failed', 0)} · "
                f"left {c.get('waiting', 0)} · ETA {_clock(eta)}")

    def render(self) -> Group:
        slots = Table(box=None, pad_edge=False)
        for column in ("slot", "trial", "epoch", "elapsed"):
            slots.add_column(column)
        now = time.monotonic()
        for name, s in self.executor.progress.slots.items():
            if s.trial:
                slots.add_row(name, s.trial, f"{s.epoch}/{s.epochs}", _clock(now - s.started))
            else:
                slots.add_row(name, "-", "", "")
        recent = Table(box=None, pad_edge=False, show_header=False)
        for e in self.executor.progress.events[-6:]:
            recent.add_row(Text(e.status, style=COLOURS.get(e.status, "")), e.name, _clock(e.seconds), e.detail[:90])
        return Group(Text(self.summary(), style="bold"), slots, recent)

    def print_new_events(self) -> None:
        events = self.executor.progress.events
        if len(events) > self.printed:
            with self.executor.ledger_lock:
                self.counts = dict(self.ledger.counts())
        for e in events[self.printed:]:
            print(f"[{self.summary()}] {e.status} {e.name} ({_clock(e.seconds)}) {e.detail}", file=sys.stderr,
                  flush=True)
        self.printed = len(events)

    def close(self) -> None:
        if self.live:
            self.live.update(self.render())
            self.live.stop()
