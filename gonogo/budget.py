"""The plan's budget: device-hours and money, an alarm at a fraction and the kill at 100%.

A plan may cap its spend in device-hours (``budget_device_hours``), in money (``budget_money`` at
``price_per_device_hour``), or both; the tighter one is the limit. Crossing
``budget_alarm_fraction`` of the limit writes a ``budget_alarm`` event (once per run); reaching the
limit is the kill: the running stage is stopped like Ctrl-C stops it (its child process groups
included), it ends ``failed`` with a ``budget kill`` reason, a ``budget_kill`` event is written
and no later stage runs. The playbook's "$10,000 GPU-hour cap as a kill threshold" is this limit.

Spend is the runner's own measure: wall time of each stage times the devices the stage occupies.
The kill needs the runner in the main thread (the stop is a SIGINT to it); elsewhere the stage
runs to its end and the plan stops after it.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1


@dataclass(frozen=True)
class Budget:
    """The limits of one plan, from its [plan] table."""

    device_hours: Optional[float]
    money: Optional[float]
    price: Optional[float]
    currency: str
    alarm_fraction: float

    @classmethod
    def of(cls, header: Any) -> "Budget":
        return cls(header.budget_device_hours, header.budget_money, header.price_per_device_hour,
                   header.currency, header.budget_alarm_fraction)

    @property
    def limit_hours(self) -> Optional[float]:
        """The device-hours the plan may spend: the tighter of the two budgets, or None (no limit)."""
        limits = [self.device_hours] if self.device_hours is not None else []
        if self.money is not None and self.price:
            limits.append(self.money / self.price)
        return min(limits) if limits else None

    @property
    def binding(self) -> Optional[str]:
        """Which budget is the limit: "money" or "device-hours"."""
        limit = self.limit_hours
        if limit is None:
            return None
        if self.money is not None and self.price and self.money / self.price <= limit:
            return "money"
        return "device-hours"

    def cost(self, hours: float) -> Optional[float]:
        return None if self.price is None else hours * self.price

    def describe(self, hours: float) -> str:
        """Spend against the binding limit, in its own unit: '0.0120 of 0.0100 USD'."""
        limit = self.limit_hours
        if self.binding == "money":
            assert self.price is not None  # a money limit needs a price (checked at load)
            return f"{hours * self.price:.4g} of {self.money:g} {self.currency} spent"
        return f"{hours:.4g} of {limit:g} device-hours spent"

    def fraction(self, hours: float) -> Optional[float]:
        limit = self.limit_hours
        return None if limit is None else hours / limit

    def event_fields(self, hours: float) -> dict[str, Any]:
        return {"device_hours": hours, "cost": self.cost(hours), "currency": self.currency,
                "limit_device_hours": self.limit_hours, "budget_money": self.money,
                "fraction": self.fraction(hours), "binding": self.binding}


class Watchdog:
    """Watches one running stage's spend; raises the alarm and, at the limit, stops the stage.

    ``used_before`` is what earlier stages spent; the running stage spends ``devices`` device-hours
    per hour of wall time. ``on_alarm``/``on_kill`` write the events; the kill then interrupts the
    main thread (the stage's waits and child processes stop as on Ctrl-C).
    """

    def __init__(self, budget: Budget, used_before: float, devices: int, *, alarm_raised: bool,
                 on_alarm: Callable[[float], None], on_kill: Callable[[float], None]):
        self.budget = budget
        self.used_before = used_before
        self.devices = max(1, devices)
        self.alarm_raised = alarm_raised
        self.on_alarm, self.on_kill = on_alarm, on_kill
        self.fired = False
        self._armed = True
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.monotonic()
        self._thread: Optional[threading.Thread] = None
        self._main = threading.current_thread() is threading.main_thread()

    def spent(self) -> float:
        return self.used_before + (time.monotonic() - self._started) / 3600.0 * self.devices

    def start(self) -> "Watchdog":
        if self.budget.limit_hours is not None:
            self._thread = threading.Thread(target=self._watch, name="gonogo-budget", daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        limit = self.budget.limit_hours
        assert limit is not None
        while not self._stop.wait(POLL_SECONDS):
            spent = self.spent()
            if not self.alarm_raised and spent >= self.budget.alarm_fraction * limit:
                self.alarm_raised = True
                self.on_alarm(spent)
            if spent >= limit:
                with self._lock:
                    if not self._armed:
                        return
                    self._armed = False
                    self.fired = True
                    self.on_kill(spent)
                    if self._main:
                        main_ident = threading.main_thread().ident
                        assert main_ident is not None  # the main thread has been running since start-up
                        signal.pthread_kill(main_ident, signal.SIGINT)
                    else:
                        log.warning("budget spent, but the runner is not in the main thread: the stage "
                                    "runs to its end and the plan stops after it")
                return

    def disarm(self) -> None:
        """The stage ended: no kill from now on (a kill already sent still counts)."""
        with self._lock:
            self._armed = False
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * POLL_SECONDS + 1)
