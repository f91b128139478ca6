"""What becoming and losing leadership means for the daemon.

Only the Lease holder refreshes, and only once it has taken over: locked its file
sinks' directories and adopted what the previous leader wrote, so it re-mints only
what is due. Jobs writing into a directory another process holds wait off the timer
and resume as soon as the lock is ours (retried every retry period). Losing
leadership releases the locks: the next leader may be another process on this host.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import structlog
from anyio.abc import TaskGroup

from refresher.clock import Clock
from refresher.errors import Refusal, SinkOwnedError
from refresher.jobset import directories
from refresher.leader import LeaderElector
from refresher.runtime import JobKey, JobRuntime
from refresher.scheduler import Scheduler
from refresher.sinks.lock import DirectoryLocks

log = structlog.get_logger("refresher")


class Leadership:
    """The daemon's side of leader election (the Lease itself is `LeaderElector`'s)."""

    def __init__(self, scheduler: Scheduler, sink_locks: DirectoryLocks, clock: Clock) -> None:
        self.scheduler = scheduler
        self.sink_locks = sink_locks
        self.clock = clock
        self.elector: LeaderElector | None = None
        self.task_group: TaskGroup | None = None
        self.leading = False
        #: Jobs a leader keeps off the timer until it holds their directories' locks.
        self._parked: dict[JobKey, tuple[JobRuntime, frozenset[str]]] = {}
        #: Bumped on every leadership change: a take-over or lock wait of an older
        #: term stops.
        self._term = 0

    def may_refresh(self, is_leader: Callable[[], bool]) -> bool:
        """Only the Lease holder refreshes, and only once it has re-read the sinks."""
        return is_leader() and (self.elector is None or self.leading)

    def changed(self, leading: bool) -> None:
        """The elector's callback."""
        log.info("leadership changed", leader=leading)
        self._term += 1
        if not leading:
            self.leading = False
            self.sink_locks.release_all()
            return
        if self.task_group is not None:
            self.task_group.start_soon(self._take_over, self._term)

    async def _take_over(self, term: int) -> None:
        """New leader: lock the sink directories, adopt what the previous leader wrote,
        then refresh only what is due."""
        if term != self._term:
            return  # no longer leading by the time this task runs
        runtimes = list(self.scheduler.jobs.values())
        refusals = self.sink_locks.acquire(directories(runtimes))
        blocked = {r.directory for r in refusals}
        adopted = 0
        for runtime in runtimes:
            waits_for = directories([runtime]) & blocked if blocked else set()
            if waits_for:
                self._park(runtime, waits_for, refusals)
                continue
            if await self._unpark(runtime):
                adopted += 1
        if term != self._term:
            return  # leadership changed meanwhile
        self.leading = True
        self.scheduler.wake()
        log.info("leading", adopted_from_sinks=adopted, jobs=len(self.scheduler.jobs))
        if refusals and self.task_group is not None:
            assert self.elector is not None
            log.warning(
                "sink directories owned by another process: their jobs wait for the lock",
                owners=[r.describe() for r in refusals],
                jobs=len(self._parked),
                retry_every=self.elector.retry_period,
            )
            self.task_group.start_soon(self._wait_for_sink_locks, term)

    def _park(self, runtime: JobRuntime, dirs: set[str], refusals: list[Refusal]) -> None:
        self._parked[runtime.key] = (runtime, frozenset(dirs))
        self.scheduler.reschedule(runtime, math.inf)
        runtime.failure_reason = "sink"
        owners = [r for r in refusals if r.directory in dirs]
        runtime.failure_message = str(SinkOwnedError(owners))

    async def _unpark(self, runtime: JobRuntime) -> bool:
        """Put a job (back) on the timer as a leader: adopt its sinks' token if still
        good (True), else refresh it now if it was parked."""
        entry = self._parked.pop(runtime.key, None)
        parked = entry is not None and entry[0] is runtime
        if parked and runtime.failure_reason == "sink":
            runtime.failure_reason = runtime.failure_message = None
        if runtime.refreshing is None and await self.scheduler.recover(runtime):
            self.scheduler.reschedule(runtime, runtime.next_refresh_at)
            return True
        if parked:
            self.scheduler.reschedule(runtime, None)
        return False

    async def _wait_for_sink_locks(self, term: int) -> None:
        """Retry the refused locks every retry period while leading; resume the jobs
        of each directory as soon as its lock is ours."""
        assert self.elector is not None
        while self._parked:
            await self.clock.sleep_until(self.clock.now() + self.elector.retry_period)
            if term != self._term:
                return
            for key, (runtime, _) in list(self._parked.items()):
                if self.scheduler.jobs.get(key) is not runtime:
                    del self._parked[key]  # removed or replaced by a reload meanwhile
            waiting = set().union(*(dirs for _, dirs in self._parked.values()))
            self.sink_locks.acquire(waiting)
            freed = {d for d in waiting if self.sink_locks.holds(d)}
            if not freed:
                continue
            resumed = 0
            for runtime, dirs in list(self._parked.values()):
                if dirs <= freed:
                    await self._unpark(runtime)
                    resumed += 1
            log.info(
                "sink directory lock acquired: resuming its jobs",
                directories=sorted(freed),
                jobs=resumed,
            )
