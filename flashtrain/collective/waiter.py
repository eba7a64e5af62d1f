"""Blocking waits on a thread of their own, so that the caller can be woken by an abort.

gloo cannot interrupt a blocked wait (``ProcessGroupGloo.abort()`` does not wake it), so
a group hands each wait to its :class:`Waiter` and blocks on an event instead, which
either the waiter or an abort sets.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable


class Outcome:
    """What became of a wait handed to a :class:`Waiter`."""

    finished: bool = False
    error: BaseException | None = None


class Waiter:
    """A daemon thread that runs a group's blocking waits one after another.

    The caller hands it a wait and blocks on an event instead, so an abort from another
    thread can wake the caller while gloo still waits (bounded by its own timeout).
    """

    def __init__(self, group_name: str):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=f"gloo-wait-{group_name}",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                # Dropping the last reference to the process group here, not in the caller:
                # ~ProcessGroupGloo joins gloo's threads, so after an abort it blocks
                # until the abandoned operation reaches its own timeout.
                self._keep = None
                return
            job()

    def submit(self, wait: Callable[[], None], wake: threading.Event) -> Outcome:
        """Run ``wait`` on the thread; ``wake`` is set when it has returned or raised."""
        outcome = Outcome()

        def job() -> None:
            try:
                wait()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                outcome.error = exc
            finally:
                outcome.finished = True
                wake.set()

        self._jobs.put(job)
        return outcome

    def stop(self, keep: object = None) -> None:
        """End the thread once its current wait is over; ``keep`` (the process group)
        is released on the thread, after that wait."""
        self._keep = keep
        self._jobs.put(None)
