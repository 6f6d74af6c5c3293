"""Multi-process runs: a process never waits forever for a peer that died.

jax.distributed detects a silent process by its heartbeats, but then aborts the
others from C++ (a stack trace, exit 134), and a collective whose peer is frozen
(SIGSTOP, a hung host) blocks until then. So each process of a training run
also runs a `PeerWatchdog`: a thread that, every `interval_s`, bumps its own
counter in the coordination service's key-value store and reads the others'.
A peer whose counter has not moved for `timeout_s` (config:
`distributed.heartbeat_timeout_s`, default 100 s), a peer that says it failed,
or a coordination service that has not answered for `timeout_s` (process 0
gone or frozen: a second thread watches the first's calls) makes the process
print one line (`error: ...`) and exit with `EXIT_PEER` (10) at once,
without saving: a multi-process checkpoint needs every process, and the last
complete one is kept (Orbax commits a step by renaming it). jax's own
heartbeat timeout is set to `2 * timeout_s + 10` s, a backstop that should
never fire first; when process 0 dies outright, though,
jax's client in each survivor notices at once and ends it with its own message
(`Terminating process because the JAX distributed service detected fatal
errors`, exit 134), which Python cannot intercept.

A peer killed outright is usually noticed sooner, by the next collective
failing (`msit_jax.training.loop.peer_lost`). A process that finishes (or stops
on SIGTERM with the others) says so, and is no longer watched.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Optional

from msit_jax.errors import EXIT_PEER, one_line

log = logging.getLogger(__name__)

KEY = "msit_jax/alive/{index}"
DONE, FAILED = "done", "failed:"


def jax_heartbeat_timeout(timeout_s: float) -> int:
    """jax.distributed's own heartbeat timeout for a watchdog of `timeout_s`: later."""
    return int(2 * timeout_s + 10)


def _client() -> Any:
    """jax.distributed's runtime client (private in jax; checked, not assumed)."""
    from jax._src import distributed

    client = getattr(getattr(distributed, "global_state", None), "client", None)
    if client is None or not all(hasattr(client, m) for m in ("key_value_set",
                                                              "key_value_try_get")):
        raise RuntimeError("jax.distributed's client has no key-value store here")
    return client


class PeerWatchdog:
    """See the module docstring. `start()` after jax.distributed.initialize; `finish(ok)`
    when the run ends (ok: finished or stopped in agreement; else failed)."""

    def __init__(self, index: int, count: int, timeout_s: float,
                 interval_s: Optional[float] = None, client: Any = None,
                 exit_fn=None):
        self.index, self.count = int(index), int(count)
        self.timeout_s = float(timeout_s)
        self.interval_s = float(interval_s or max(0.2, min(5.0, self.timeout_s / 5)))
        self.client = client if client is not None else _client()
        self._exit = exit_fn or _exit_now
        self._stop = threading.Event()
        self._failing = threading.Lock()
        self._last_ok = time.monotonic()
        self._threads = [threading.Thread(target=self._run, daemon=True,
                                          name="msit-peer-watchdog"),
                         threading.Thread(target=self._monitor, daemon=True,
                                          name="msit-peer-watchdog-monitor")]

    def start(self) -> "PeerWatchdog":
        """Start watching (no call to the service here: it may already be frozen)."""
        self._last_ok = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def finish(self, ok: bool, why: str = "", wait_s: float = 2.0) -> None:
        """Stop watching and tell the peers (done, or failed with `why`); waits at most
        `wait_s` for the service."""
        self._stop.set()
        value = DONE if ok else FAILED + one_line(why, 300)

        def tell():
            try:
                self._publish(value)
            except Exception:  # noqa: BLE001 - the service may be gone already
                pass

        t = threading.Thread(target=tell, daemon=True, name="msit-peer-watchdog-finish")
        t.start()
        t.join(wait_s)

    def _publish(self, value: str) -> None:
        self.client.key_value_set(KEY.format(index=self.index), value, allow_overwrite=True)

    def _read(self, j: int) -> Optional[str]:
        try:
            return self.client.key_value_try_get(KEY.format(index=j))
        except Exception as e:  # noqa: BLE001
            if "not_found" in str(e).lower().replace(" ", "_"):
                return None  # no beat yet
            raise

    def _run(self) -> None:
        """The beats: publish, read the peers, judge them."""
        now = time.monotonic()
        seen: dict[int, tuple[Optional[str], float]] = {
            j: (None, now) for j in range(self.count) if j != self.index}
        beat, wait = 0, 0.0
        while not self._stop.wait(wait):
            wait = self.interval_s
            beat += 1
            try:
                self._publish(str(beat))
                values = {j: self._read(j) for j in seen}
            except Exception:  # noqa: BLE001 - unreachable: `_monitor` judges the silence
                continue
            now = self._last_ok = time.monotonic()
            for j, v in values.items():
                last, since = seen[j]
                if v == DONE:
                    continue
                if v is not None and v.startswith(FAILED):
                    # Its error may be this process's too (the same step, the same data):
                    # give the main thread a moment to report its own first.
                    if self._stop.wait(min(5.0, self.timeout_s)):
                        return
                    self._fail(f"process {j} failed ({v[len(FAILED):] or 'see its log'})")
                    return
                if v != last:
                    seen[j] = (v, now)
                elif now - since > self.timeout_s:
                    self._fail(f"process {j} has shown no sign of life for {self.timeout_s:g} s "
                               "(killed, frozen or its host gone)")
                    return

    def _monitor(self) -> None:
        """The coordination service's own silence: a call that fails, or one that never
        returns (process 0 frozen), stops the beats; nothing answered for timeout_s is a
        lost coordinator."""
        while not self._stop.wait(self.interval_s):
            if time.monotonic() - self._last_ok > self.timeout_s:
                self._fail(f"the coordination service (process 0) has not answered for "
                           f"{self.timeout_s:g} s")
                return

    def _fail(self, why: str) -> None:
        with self._failing:
            if self._stop.is_set():
                return
            self._stop.set()  # one line, from one thread
        self._exit(f"error: another process of this multi-process run is lost: {why}; process "
                   f"{self.index} of {self.count} stops now without saving (the latest "
                   "complete checkpoint is kept): restart every process to resume "
                   f"(distributed.heartbeat_timeout_s={self.timeout_s:g})")


def _exit_now(line: str) -> None:
    os.write(2, ("\n" + line + "\n").encode())
    os._exit(EXIT_PEER)
