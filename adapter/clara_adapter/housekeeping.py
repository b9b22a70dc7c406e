"""Periodic upkeep on a thread of its own.

Retention deletes whole payload folders (``rmtree`` of thousands of files may
take seconds); on the timer thread that would push group closes past their
deadline, so housekeeping never runs there."""
from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


class Housekeeper:
    def __init__(self, interval: float, task: Callable[[], None], name: str = "clara-housekeeping"):
        self.interval = interval
        self.task = task
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.task()
            except Exception:
                log.exception("housekeeping failed")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
