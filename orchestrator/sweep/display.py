"""Live sweep progress: a rich table on a terminal, one line per finished trial otherwise."""
from __future__ import annotations

import sys
import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from orchestrator.sweep.executor import Executor
from orchestrator.sweep.ledger import Ledger

COLOURS = {"finished": "green", "diverged": "yellow", "pruned": "cyan", "failed": "red", "retried": "magenta",
           "released": "blue"}


def eta_seconds(done_seconds: list[float], left: int, running: int, slots: int) -> float | None:
    """Mean trial time so far × trials still to run (a running one counts half) / slots."""
    if not done_seconds:
        return None
    return sum(done_seconds) / len(done_seconds) * (left + running / 2) / max(slots, 1)


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
        times = [e.seconds for e in self.executor.progress.events if e.status in ("finished", "diverged", "pruned")]
        eta = eta_seconds(times, c.get("waiting", 0), c.get("running", 0), len(self.executor.slots))
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
