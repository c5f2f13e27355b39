"""The daemon: one uvloop event loop, one root TaskGroup, sessions per VM.

Wiring only; policy lives in wsd.tracker and wsd.evictor, storage in
wsd.storage, syscalls in wsd.kernel.  Each hand-off accepted on the socket
becomes a :class:`Session`: its uffd is watched with ``loop.add_reader``
(fault service never waits for a cycle or for eviction I/O) and a task runs
the tracking cycle, with the evictor as its hook, every interval.  A session
that fails is torn down and logged; the daemon and the other sessions go on.

A session that ends while its VMM is alive first brings every evicted page
back (``drain``), so no guest page is ever left in storage with nobody to
serve it.  If the VMM is gone, its pages are discarded from storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import signal
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# np.unique, which the page state runs on the fault path too, imports numpy.ma
# the first time it is called (for np.ma.is_masked): 10 ms on the host, on the
# event loop, with the first session's faults waiting.  Imported at start-up.
import numpy.ma
import numpy.typing as npt
import structlog
import uvloop

from wsd import fdstore, recovery, resume, sdnotify
from wsd.access import AccessPolicy
from wsd.cancellation import despite_cancellation
from wsd.collector import freeze_startup_objects, thaw_startup_objects
from wsd.config import MetricsSection, WsdConfig
from wsd.control.commands import ControlCommands
from wsd.control.eviction import EvictionRequest
from wsd.control.server import ControlServer
from wsd.durations import CycleTimings
from wsd.evictor import EvictorConfig
from wsd.evictor.context import VmContext
from wsd.evictor.drain import drain
from wsd.evictor.events import on_event
from wsd.evictor.evictor import Evictor
from wsd.evictor.faults import FaultService
from wsd.kernel import (
    KernelError,
    KernelFeatures,
    PageFault,
    close_fds,
    effective_uid,
    probe_kernel,
)
from wsd.metrics import MetricsServer, MetricsState, make_registry, serve_metrics
from wsd.priority import LoopPriority, raise_fault_service
from wsd.recovery import RecoveryError
from wsd.storage import PageStore, StorageConfig, StorageError
from wsd.storage.registry import open_backend
from wsd.tracker.mode import ModeDecision, TrackingMode, choose_mode
from wsd.tracker.session import VmTracker
from wsd.vmm.claims import Claim, check_unclaimed
from wsd.vmm.kept import VmmKeeper
from wsd.vmm.limits import HandoffLimits
from wsd.vmm.mappings import check_mappings, check_registered
from wsd.vmm.protocol import ErrorCode, HandoffError, HandoffRequest
from wsd.vmm.server import Accepted, HandoffServer, PeerCred, accepted_reply

log = structlog.get_logger("wsd")


class StartupError(Exception):
    """The daemon cannot start with this configuration; the message says why."""


@dataclass(frozen=True)
class Settings:
    """What the daemon runs with; :meth:`from_config` builds it from the TOML file."""

    socket: Path = Path("/run/wsd/wsd.sock")
    control_socket: Path | None = None
    """Where ``wsd status`` and ``wsd vm ...`` reach the daemon; None: nowhere."""
    config_path: Path | None = None
    """The file these settings came from, for ``wsd status``."""
    interval: float = 1.0
    mode: TrackingMode | None = None
    storage: StorageConfig | None = None
    """Where evicted pages go; None: track only, never evict."""
    evictor: EvictorConfig = field(default_factory=EvictorConfig)
    state_dir: Path | None = None
    """Where page maps are persisted (None: not persisted)."""
    vm_evictor: Mapping[str, EvictorConfig] = field(default_factory=dict)
    """Per-VM evictor settings, by vm_id."""
    metrics: MetricsSection | None = None
    """Where to serve Prometheus metrics; None: not served."""
    access: AccessPolicy = field(default_factory=AccessPolicy)
    """Who may connect, and the sockets' mode and group."""
    limits: HandoffLimits = field(default_factory=HandoffLimits)
    """Bounds on hand-off clients: message time, pending connections, sessions, sizes."""

    @classmethod
    def from_config(cls, config: WsdConfig) -> Settings:
        d = config.daemon
        return cls(
            socket=d.socket,
            control_socket=d.control_socket,
            interval=d.interval_seconds,
            mode=d.mode,
            storage=config.storage,
            evictor=config.evictor,
            state_dir=d.state_dir,
            vm_evictor={vm_id: config.evictor_for(vm_id) for vm_id in config.vm},
            metrics=config.metrics if config.metrics.enabled else None,
            access=AccessPolicy.from_config(config.access),
            limits=config.limits,
        )

    def evictor_for(self, vm_id: str) -> EvictorConfig:
        return self.vm_evictor.get(vm_id, self.evictor)


@dataclass
class Session:
    vm_id: str
    tracker: VmTracker
    memfds: list[int]
    ctx: VmContext
    faults: FaultService
    evictor: Evictor
    last_hot: list[npt.NDArray[np.uint8]] = field(default_factory=list)
    """Per region, the pages the last scan found hot, as a packed bitmap
    (``np.packbits``, 32 KiB per GiB of 4 KiB pages): a copy, since the next
    scan rewrites the tracker's own bitmaps in a worker thread."""
    task: asyncio.Task[None] | None = None
    closed: bool = False
    paused: bool = False
    """Eviction paused by an operator (``wsd vm pause``); tracking goes on."""
    eviction: EvictionRequest | None = None
    """An operator's one-shot eviction (``wsd vm evict``) under way."""
    timings: CycleTimings = field(default_factory=CycleTimings)
    owner_uid: int | None = None
    """The effective uid of the VMM process: that user may address the VM on the
    control socket.  None if the VMM was already gone at the start."""
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once the session has ended and wound up (``Daemon._end``)."""
    claim: Claim | None = None
    """Its uffd and guest memory, which no other session may hand off meanwhile."""

    def hot_pages(self, region: int) -> npt.NDArray[np.intp]:
        """The pages of ``region`` the last scan found hot."""
        count = self.tracker.regions[region].npages
        return np.flatnonzero(np.unpackbits(self.last_hot[region], count=count))


class Daemon:
    def __init__(
        self,
        settings: Settings,
        *,
        kernel: KernelFeatures | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.kernel = kernel or probe_kernel()
        self.decision: ModeDecision = choose_mode(self.kernel, settings.mode)
        self.clock = clock
        self.started_at = clock()
        self.sessions: dict[str, Session] = {}
        self.draining: dict[str, Session] = {}
        """Sessions that ended and are bringing their evicted pages back (still in status)."""
        # Hand-offs between their checks and their session's start: the
        # tracker is started in a worker thread meanwhile.
        self._starting: set[str] = set()
        # The uffds and guest memory of every session, and of hand-offs on their
        # way to one, until the session has wound up.
        self._claims: list[Claim] = []
        # Per vm_id, the verified-punch pipes of a session that stayed parked
        # (read ends by part; also in the fd store, or with its VMM).  Its
        # VMM's reattach puts back what they hold; a new session of the VM
        # takes them out of the store first, or systemd would keep both its
        # pipes and these under the same names.
        self._parked_pipes: dict[str, dict[int, int]] = {}
        self.store: PageStore | None = None
        self.metrics_state = MetricsState()
        self.metrics_server: MetricsServer | None = None
        self.server = HandoffServer(
            settings.socket, self.handoff, access=settings.access, limits=settings.limits
        )
        self.control: ControlServer | None = None
        if settings.control_socket is not None:
            commands = ControlCommands(self)
            self.control = ControlServer(
                settings.control_socket,
                commands,
                access=settings.access,
                limits=settings.limits,
                owner_of=commands.owner_uid,
            )
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self.ready = asyncio.Event()
        """Set once every socket and the metrics server are up (when systemd hears READY=1)."""
        self.fault_service: LoopPriority | None = None
        """The event loop thread's scheduling while :meth:`run` runs (wsd.priority)."""

    # -- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        """Serve until :meth:`stop`; then end every session."""
        # Before any pool starts a thread: each takes its priority from this one's
        # (wsd.priority).
        priority = self.fault_service = raise_fault_service()
        try:
            await self._serve(priority)
        finally:
            priority.restore()
            self.fault_service = None

    async def _serve(self, priority: LoopPriority) -> None:
        log.info(
            "wsd starting",
            mode=str(self.decision.mode),
            reason=self.decision.reason,
            limitations=list(self.decision.limitations),
            socket=str(self.settings.socket),
            fault_service=str(priority),
        )
        if self.settings.storage is not None and self.settings.evictor.enabled:
            self.store = await open_backend(self.settings.storage)
            log.info("storage open", backend=self.store.name, durable=self.store.durable)
            if not self.store.durable and not self.settings.evictor.allow_volatile_store:
                await self.store.close()
                raise StartupError(
                    f"storage {self.store.name!r} is not durable: a wsd crash would lose "
                    'every evicted page.  Put a durable tier below it (kind = "tiered"), '
                    "or set evictor.allow_volatile_store = true to accept that"
                )
        self.server.listen()
        metrics = None
        try:
            if self.control is not None:
                try:
                    self.control.listen()
                except OSError as e:
                    raise StartupError(str(e)) from e
            if self.settings.metrics is not None:
                m = self.settings.metrics
                registry = make_registry(self, self.metrics_state)
                metrics = self.metrics_server = await serve_metrics(registry, m.host, m.port)
                host, port = metrics.address
                log.info("serving metrics", address=f"{host}:{port}")
            # Before the sessions: what exists now lives as long as the daemon.
            log.info("startup objects frozen", objects=freeze_startup_objects())
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                await self._resume_stored()
                serving = tg.create_task(self.server.serve())
                controlling = tg.create_task(self.control.serve()) if self.control else None
                refreshing = tg.create_task(self._refresh_store_stats())
                interval = sdnotify.watchdog_interval()
                watchdog = tg.create_task(_keep_alive(interval)) if interval else None
                sdnotify.ready(f"listening on {self.settings.socket}, mode {self.decision.mode}")
                self.ready.set()
                await self._stop.wait()
                sdnotify.stopping(f"draining {len(self.sessions)} VMs")
                serving.cancel()
                if controlling is not None:
                    controlling.cancel()
                refreshing.cancel()
                for session in list(self.sessions.values()):
                    # Bringing every evicted page back may take a while.
                    sdnotify.extend_timeout(60)
                    await self._end(session)
                if watchdog is not None:
                    watchdog.cancel()
        finally:
            for session in list(self.sessions.values()):
                await self._end(session)
            # Still in the store (or with their VMMs), for the next wsd.
            for pipes in self._parked_pipes.values():
                close_fds(list(pipes.values()))
            self._parked_pipes.clear()
            self._tg = None
            if metrics is not None:
                await metrics.close()
            if self.store is not None:
                await self.store.close()
            thaw_startup_objects()  # for a process that goes on (tests run daemons in turn)
            log.info("wsd stopped")

    async def _refresh_store_stats(self) -> None:
        """Keep the store's stats snapshot for the metrics fresh (stats() is async)."""
        while self.store is not None:
            try:
                await self.metrics_state.refresh(self.store, self.clock())
            except StorageError as e:
                log.warning("reading storage stats failed", error=str(e))
            await asyncio.sleep(self.settings.interval)

    def stop(self) -> None:
        self._stop.set()

    def _status(self) -> None:
        evicted = sum(
            t.state.evicted_pages * t.region.page_size
            for s in self.sessions.values()
            for t in s.tracker.regions
        )
        sdnotify.status(
            f"{len(self.sessions)} VMs, mode {self.decision.mode}, {evicted >> 20} MiB evicted"
        )

    def reload(self, new: Settings) -> None:
        """Apply reloadable tunables without dropping sessions.

        The interval and every evictor setting (global and per VM) take effect
        at the next cycle.  The sockets, tracking mode, storage, state
        directory, access and limits need a restart: a change to them is
        logged and ignored.
        """
        old = self.settings
        fixed = {
            "socket": (old.socket, new.socket),
            "mode": (old.mode, new.mode),
            "storage": (old.storage, new.storage),
            "state_dir": (old.state_dir, new.state_dir),
            "access": (old.access, new.access),
            "limits": (old.limits, new.limits),
            "control_socket": (old.control_socket, new.control_socket),
        }
        ignored = [name for name, (a, b) in fixed.items() if a != b]
        if ignored:
            log.warning("reload: these settings need a restart, kept as they were", keys=ignored)
        self.settings = dataclasses.replace(
            new,
            socket=old.socket,
            mode=old.mode,
            storage=old.storage,
            state_dir=old.state_dir,
            access=old.access,
            limits=old.limits,
            control_socket=old.control_socket,
        )
        for session in self.sessions.values():
            config = self.settings.evictor_for(session.vm_id)
            session.ctx.config = config
            session.ctx.vm.reconfigure(config)
        log.info(
            "configuration reloaded",
            interval=self.settings.interval,
            sessions=len(self.sessions),
        )

    # -- sessions --------------------------------------------------------------

    async def handoff(self, req: HandoffRequest, fds: list[int], peer: PeerCred) -> Accepted:
        memfds = [fds[i] for i in sorted({r.fd_index for r in req.regions})]
        problem = None
        if req.vm_id in self.sessions or req.vm_id in self._starting:
            problem = HandoffError(
                ErrorCode.DUPLICATE, f"vm_id {req.vm_id!r} has a session", "vm_id"
            )
        elif self._tg is None:
            problem = HandoffError(ErrorCode.INTERNAL, "wsd is shutting down")
        if problem:
            close_fds(fds)
            raise problem
        self._starting.add(req.vm_id)
        claim = None
        try:
            try:
                await self._after_last_session(req.vm_id)
                claim = self._claim(req, fds)
            except BaseException:
                close_fds(fds)  # ours until the tracker's start takes them
                raise
            tracker = await self._tracker_off_loop(req, fds, memfds)
            session = self._start_session(
                req.vm_id, tracker, memfds, new=req.type == "handoff", claim=claim
            )
        except BaseException:
            if claim is not None:
                self._claims.remove(claim)
            raise
        finally:
            self._starting.discard(req.vm_id)
        granularity = [str(t.state.granularity) for t in tracker.regions]
        if req.type == "reattach":
            evicted = sum(t.state.evicted_pages for t in tracker.regions)
            reply = accepted_reply(
                req, str(tracker.mode), granularity=granularity, evicted_pages=evicted
            )
        else:
            reply = accepted_reply(req, str(tracker.mode), granularity=granularity)
        return Accepted(
            reply, lambda: self._end_soon(session), functools.partial(self._vmm_keeps, session)
        )

    @staticmethod
    def _vmm_keeps(session: Session, conn: socket.socket) -> None:
        """Without an fd store, the VMM keeps the session's verified-punch pipes
        across a wsd crash (:mod:`wsd.vmm.kept`)."""
        parking = session.evictor.parking
        if parking is not None and not parking.systemd and not session.closed:
            parking.vmm = VmmKeeper(session.vm_id, conn)

    async def _after_last_session(self, vm_id: str) -> None:
        """Wait until the VM's last session has ended, if it is still winding up.

        Both sessions would share the VM's storage namespaces (vm_id and
        region index) and state files.  The new one's evictions overwrite the
        pages the last one has yet to bring back (its drain then finds a
        newer generation and cannot), and the last one's end discards the
        namespaces and deletes the state files under the new one.  A VM
        restarted by its manager (same name, new VMM) hands off again at
        once; its last VMM is usually gone, so that drain ends quickly.
        """
        last = self.draining.get(vm_id)
        if last is None:
            return
        try:
            async with asyncio.timeout(LAST_SESSION_WAIT_SECONDS):
                await last.ended.wait()
        except TimeoutError:
            left = sum(t.state.evicted_pages for t in last.tracker.regions)
            raise HandoffError(
                ErrorCode.DUPLICATE,
                f"vm_id {vm_id!r}: its last session ended and is still bringing its evicted "
                f"pages back ({left} left) after {LAST_SESSION_WAIT_SECONDS:g} s; hand off "
                "again once it is done (wsd status shows it as draining)",
                "vm_id",
            ) from None

    def _claim(self, req: HandoffRequest, fds: list[int]) -> Claim:
        """Hold the hand-off's uffd and memory ranges, unless a session, or a hand-off
        on its way, holds any of them already (``wsd.vmm.claims``)."""
        uffd = fds[req.uffd.fd_index]
        claim = Claim.take(req.vm_id, uffd, [(r, fds[r.fd_index]) for r in req.regions])
        check_unclaimed(claim, self._claims)
        self._claims.append(claim)
        return claim

    async def _tracker_off_loop(
        self, req: HandoffRequest, fds: list[int], memfds: list[int]
    ) -> VmTracker:
        """The hand-off's tracker, started (or re-adopted) in a worker thread.

        Arming protects the whole guest, a kernel walk of milliseconds per GiB
        (38 ms for 4 GiB on the development VM), and a resume or a reattach
        reads state files: the loop goes on serving the other VMs' faults
        meanwhile.  Owns the fds: closes them if it fails, is cancelled or wsd
        began to shut down.
        """
        work = asyncio.get_running_loop().run_in_executor(
            None, self._start_tracker, req, fds, memfds
        )
        cancelled = await despite_cancellation(work)
        if not cancelled and self._tg is not None:
            return work.result()  # or what it raised, having closed the fds
        if work.exception() is None:
            self._drop_tracker(req.vm_id, work.result(), memfds, new=req.type == "handoff")
        if cancelled:
            raise asyncio.CancelledError
        raise HandoffError(ErrorCode.INTERNAL, "wsd is shutting down")

    def _drop_tracker(
        self, vm_id: str, tracker: VmTracker, memfds: list[int], *, new: bool
    ) -> None:
        """Let go of a tracker whose session never started, and close the memfds.

        A ``new`` hand-off has evicted nothing: the next wsd must not take it
        from the fd store, and the VMM gets its memory back as it came
        (``VmTracker.abandon``).  A failed unpark is logged: the caller is
        reporting what failed first.  A reattached or resumed session stays
        parked and registered: its pages may be in storage.
        """
        try:
            if new and self.settings.state_dir is not None:
                resume.unpark(self.settings.state_dir, vm_id, len(memfds))
        except Exception:
            log.exception("unparking a hand-off that never started failed", vm_id=vm_id)
        finally:
            try:
                if new:
                    tracker.abandon()
                else:
                    tracker.close()
            finally:
                close_fds(memfds)

    def _start_tracker(self, req: HandoffRequest, fds: list[int], memfds: list[int]) -> VmTracker:
        """A new or reattached tracker, parked if wsd keeps state; closes the fds on failure."""
        # The server checked on_behalf ones (forbidden if they differ).  A reattach
        # must name the regions first handed off, which may have moved or gone
        # since: resume.adopt finds those.
        try:
            if req.type == "handoff" and not req.on_behalf:
                check_mappings(req, fds, code=ErrorCode.BAD_REGION)
            if req.type == "handoff" and self.settings.state_dir is not None:
                self._take_over(self.settings.state_dir, req.vm_id)
        except BaseException:
            close_fds(fds)
            raise
        uffd_fd = fds[req.uffd.fd_index]
        if req.type == "reattach":
            held = {k: fds[index] for k, index in enumerate(req.held)}
            return self._reattach(req, uffd_fd, memfds, held)
        try:
            # From here the tracker owns the uffd fd (and closes it if it fails).
            tracker = VmTracker.start(
                req.vm_id,
                vmm_pid=req.vmm_pid,
                spec=req.uffd,
                uffd_fd=uffd_fd,
                regions=[(r, fds[r.fd_index]) for r in req.regions],
                decision=self.decision,
                kernel=self.kernel,
                clock=self.clock,
            )
        except BaseException:
            close_fds(memfds)
            raise
        try:
            check_registered(req)
            if self.settings.state_dir is not None:
                # Before anything is evicted: from here a wsd crash loses nothing.
                resume.park(self.settings.state_dir, req.vm_id, req.vmm_pid, tracker, memfds)
        except BaseException:
            self._drop_tracker(req.vm_id, tracker, memfds, new=True)
            raise
        return tracker

    def _unpark_pipes(self, vm_id: str) -> None:
        """Close the pipes a session of ``vm_id`` left parked in this process and
        take them out of the fd store, before a new session of the VM parks its own."""
        pipes = self._parked_pipes.pop(vm_id, {})
        close_fds(list(pipes.values()))
        fdstore.remove_held(vm_id, len(pipes))

    def _take_over(self, state_dir: Path, vm_id: str) -> None:
        """Unpark what an earlier session of ``vm_id`` left (``resume.take_over``),
        or refuse the hand-off while that session's VMM runs."""
        parked = resume.take_over(state_dir, vm_id)
        if parked is None:
            self._unpark_pipes(vm_id)
        else:
            raise HandoffError(
                ErrorCode.DUPLICATE,
                f"vm_id {vm_id!r} has a parked session of pid {parked.vmm_pid}, which still "
                "runs: its evicted pages are in storage and only that VMM can take them back, "
                f"with a reattach.  Hand {vm_id!r} off anew once that process has exited",
                "vm_id",
            )

    def _reattach(
        self, req: HandoffRequest, uffd_fd: int, memfds: list[int], held: dict[int, int]
    ) -> VmTracker:
        """A VMM hands back the uffd of a session a wsd that died had (no systemd fd store),
        and the pipes that wsd gave it to keep (``held``, by part).

        Same checks as a resume from the fd store, and the regions must be
        the ones handed off the first time.  Closes the fds if it refuses.
        """
        try:
            state_dir = self.settings.state_dir
            if state_dir is None:
                raise HandoffError(
                    ErrorCode.UNSUPPORTED, "wsd runs without a state_dir: nothing to reattach"
                )
            try:
                record, vmap, ceiling = resume.load(state_dir, req.vm_id)
            except RecoveryError as e:
                raise HandoffError(
                    ErrorCode.NO_SESSION, f"no session of {req.vm_id!r} to reattach: {e}", "vm_id"
                ) from e
            if record.vmm_pid != req.vmm_pid or not resume.same_process(record):
                raise HandoffError(
                    ErrorCode.FORBIDDEN,
                    f"{req.vm_id!r} was handed off by pid {record.vmm_pid}, which is not "
                    f"pid {req.vmm_pid} or has exited since",
                    "vmm_pid",
                )
            wanted = [
                r.model_copy(update={"fd_index": k})
                for r, k in zip(req.regions, resume.memfd_positions(req.regions), strict=True)
            ]
            if wanted != record.regions:
                raise HandoffError(
                    ErrorCode.BAD_REGION,
                    "the regions differ from the ones first handed off (see "
                    f"{recovery.session_path(state_dir, req.vm_id)})",
                    "regions",
                )
            resume.remove_temporaries(state_dir, req.vm_id)
        except BaseException:
            close_fds([uffd_fd, *memfds, *held.values()])
            raise
        # Parked when the session's drain gave up, in this process: the VMM
        # may give back the same pipes (no fd store), and this process's are
        # all of them.  The put-back takes them out of the store.
        parked = self._parked_pipes.pop(req.vm_id, {})
        if parked:
            close_fds(list(held.values()))
            held = parked
        try:
            tracker = resume.adopt(
                record,
                vmap,
                uffd_fd,
                memfds,
                ceiling=ceiling,
                kernel=self.kernel,
                clock=self.clock,
                held=held,
            )
        except BaseException:
            close_fds(memfds)
            # Not put back: the reattached session parks pipes of its own.
            fdstore.remove_held(req.vm_id, len(held))
            raise
        fdstore.store(req.vm_id, tracker.uffd.fd, memfds)
        return tracker

    def _start_session(
        self,
        vm_id: str,
        tracker: VmTracker,
        memfds: list[int],
        *,
        new: bool = False,
        claim: Claim | None = None,
    ) -> Session:
        """Serve faults and run cycles for a tracker (``new``ly handed off, or
        reattached or resumed); owns its fds.  ``claim``: what the hand-off
        holds (None: a resumed session, whose claim is taken here)."""
        assert self._tg is not None
        tg = self._tg
        try:
            evictor_config = self.settings.evictor_for(vm_id)
            ctx = VmContext(vm_id, tracker, self.store, evictor_config, self.clock)
            evictor = Evictor(ctx, state_dir=self.settings.state_dir, host_room=self._host_room)
            if claim is None:
                regions = [(t.region, t.memfd) for t in tracker.regions]
                claim = Claim.take(vm_id, tracker.uffd.fd, regions)
                self._claims.append(claim)
        except BaseException:
            self._drop_tracker(vm_id, tracker, memfds, new=new)
            raise
        session = Session(vm_id, tracker, memfds, ctx, FaultService(ctx, tg.create_task), evictor)
        session.claim = claim
        if tracker.pagemap.pid is not None:
            with contextlib.suppress(ProcessLookupError, ValueError):
                session.owner_uid = effective_uid(tracker.pagemap.pid)
        self.sessions[vm_id] = session
        loop = asyncio.get_running_loop()
        session.ctx.in_flight.serve = functools.partial(self._serve_fault, session)
        loop.add_reader(tracker.uffd.fd, self._on_uffd, session)
        session.task = tg.create_task(self._cycles(session))
        if not new:
            session.faults.spawn(resume.check_stored(ctx))
        self._status()
        return session

    async def _resume_stored(self) -> None:
        """Take back the sessions a previous wsd parked in systemd's fd store."""
        for stored in fdstore.take_listen_fds().values():
            try:
                resumed = await resume.resume(
                    stored,
                    state_dir=self.settings.state_dir,
                    store=self.store,
                    kernel=self.kernel,
                    clock=self.clock,
                )
            except Exception:
                # Never a crash loop at start: log it, and the others resume.
                # (The fds were closed by whoever failed; the store keeps its
                # copies for the next start.)
                log.exception("resuming a stored session failed", vm_id=stored.vm_id)
                continue
            if resumed is not None:
                self._start_session(stored.vm_id, resumed.tracker, resumed.memfds)

    async def _cycles(self, session: Session) -> None:
        """Every interval: a window (scan, commit what was prepared), then prepare more.

        Preparing (reading and storing the next pages) happens between windows
        and counts against the interval; when it takes longer, the next window
        opens as soon as it is done.
        """
        loop = asyncio.get_running_loop()
        try:
            next_at = loop.time() + self.settings.interval
            while True:
                await asyncio.sleep(max(0.0, next_at - loop.time()))
                await self._cycle(session)
                # Read each time: a reload may have changed it.
                next_at = max(next_at + self.settings.interval, loop.time())
        except asyncio.CancelledError:
            raise
        except KernelError as e:
            # Most often the VMM went away mid-cycle (its pagemap is gone).
            log.warning("tracking stopped", vm_id=session.vm_id, error=str(e))
            await self._end(session)
        except Exception:
            log.exception("tracking failed", vm_id=session.vm_id)
            await self._end(session)

    async def _cycle(self, session: Session) -> None:
        """One interval's work, timed: the window (scan, commit), then prepare."""
        timings = session.timings
        started = self.clock()

        async def commit(tracker: VmTracker, hot: list[npt.NDArray[np.bool_]]) -> None:
            # The hook runs right after the scan: timing it here keeps
            # wsd.tracker free of metrics.
            timings.scan.observe(self.clock() - started)
            await session.evictor.commit(tracker, hot)

        session.last_hot = [np.packbits(h) for h in await session.tracker.cycle(commit)]
        if session.tracker.mode is TrackingMode.RWP:
            timings.window.observe(self.clock() - started)
        await _prepare(session)
        timings.cycle.observe(self.clock() - started)

    def _on_uffd(self, session: Session) -> None:
        tracker = session.tracker
        try:
            messages = tracker.uffd.read_messages()
        except KernelError as e:
            log.warning("reading the uffd failed", vm_id=session.vm_id, error=str(e))
            return
        # Faults are timed from here: the kernel's message carries no timestamp,
        # so how long one waited to be read is not known.
        read_at = self.clock()
        for msg in messages:
            if not isinstance(msg, PageFault):
                # REMOVE, UNMAP, REMAP: the VMM's madvise/munmap/mremap waited
                # for this read; the state changes now (docs/life-events.md).
                on_event(session.faults, session.evictor, msg)
            elif not session.faults.waits_for_punch(msg, read_at):
                self._serve_fault(session, msg, read_at)

    def _serve_fault(
        self, session: Session, msg: PageFault, read_at: float, *, waited: float | None = None
    ) -> None:
        """``waited``: this fault found no memory before, and waited that long."""
        tracker = session.tracker
        # An RWP fault read after its window closed stalls nobody: going
        # async released its vCPU.
        stalled = tracker.in_window or not msg.is_rwp
        try:
            if tracker.on_fault(msg):
                if stalled:
                    kind = "rwp" if msg.is_rwp else "minor"
                    session.timings.stall.observe(kind, self.clock() - read_at)
                return
            if msg.is_missing:
                session.faults.on_missing(msg, read_at)
            elif not (msg.is_minor and session.faults.on_minor(msg, read_at)):
                log.error("unhandled fault", vm_id=session.vm_id, fault=repr(msg))
        except KernelError as e:  # e.g. the VMM exited under us
            if e.errno == errno.ENOMEM:
                self._serve_later(session, msg, read_at, waited, e)
                return
            # Logged, and the rest of the batch (a life event, maybe) still
            # handled.
            log.warning("serving a fault failed", vm_id=session.vm_id, error=str(e))

    def _serve_later(
        self,
        session: Session,
        msg: PageFault,
        read_at: float,
        waited: float | None,
        error: KernelError,
    ) -> None:
        """No memory for the page now (a hugetlbfs pool without a spare page, a
        cgroup at its limit): its thread waits, and the fault is served again
        after the fetch backoff.  Dropped, it would wait forever."""
        cfg = session.ctx.config
        if waited is None:
            log.warning(
                "no memory to serve a fault; it waits and is served again",
                vm_id=session.vm_id,
                address=hex(msg.address),
                error=str(error),
            )
            delay = cfg.fetch_retry_initial_seconds
        else:
            delay = min(waited * 2, cfg.fetch_retry_max_seconds)

        async def later() -> None:
            await asyncio.sleep(delay)
            if not session.faults.waits_for_punch(msg, read_at):
                self._serve_fault(session, msg, read_at, waited=delay)

        session.faults.spawn(later())

    def _host_room(self) -> int | None:
        """Bytes the host-wide evicted-fraction cap still allows."""
        cap = self.settings.evictor.host_evicted_fraction_max
        if cap is None:
            return None
        total = evicted = 0
        for s in self.sessions.values():
            for t in s.tracker.regions:
                total += t.region.size
                evicted += t.state.evicted_pages * t.region.page_size
        return max(0, int(cap * total) - evicted)

    async def _end_soon(self, session: Session) -> None:
        """End a session whose VMM hung up, in a task of the root group.

        The hand-off server calls this from the connection's task, which a
        shutdown cancels: a drain cut short there would leave the session
        parked and half-drained.  The root group's task finishes it (the
        group waits for it), and the shutdown does not start it twice.
        """
        assert self._tg is not None
        await asyncio.shield(self._tg.create_task(self._end(session)))

    async def _end(self, session: Session) -> None:
        if session.closed:
            return
        session.closed = True
        self.sessions.pop(session.vm_id, None)
        self.draining[session.vm_id] = session
        try:
            await self._wind_up(session)
        finally:
            # From here a new hand-off of this vm_id may start (handoff waits).
            if self.draining.get(session.vm_id) is session:
                del self.draining[session.vm_id]
            if session.claim in self._claims:
                self._claims.remove(session.claim)
            session.ended.set()

    async def _wind_up(self, session: Session) -> None:
        """Bring an ended session's pages back, let go of its memory, and drop its
        state if nothing is left in storage."""
        if session.eviction is not None:
            session.eviction.abandon(
                f"VM {session.vm_id!r}'s session ended before the eviction was committed"
            )
        if session.task is not None and session.task is not asyncio.current_task():
            session.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await session.task
        done = False
        try:
            # Faults keep being served while the pages come back.
            done = await drain(session.ctx, session.faults)
        finally:
            await session.faults.close()
            if session.evictor.parking is not None:
                # No punch is in flight between steps.  Parked sessions keep
                # their pipes parked: they may hold held-back pages.
                if done:
                    session.evictor.parking.close()
                else:
                    self._parked_pipes[session.vm_id] = session.evictor.parking.stay_parked()
            loop = asyncio.get_running_loop()
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(session.tracker.uffd.fd)
            if done and self._tg is not None:
                session.tracker.release()
                self._tg.create_task(_linger(session.tracker, session.memfds))
            else:
                # Pages may stay in storage: keep the registration, so the VMM
                # blocks on them instead of reading zeros, until a wsd resumes.
                try:
                    session.tracker.close()
                finally:
                    await _close_memfds(session.memfds)
        if self.settings.state_dir is not None:
            if done:
                state_dir = self.settings.state_dir
                session.evictor.drop_state(
                    lambda: resume.unpark(state_dir, session.vm_id, len(session.memfds))
                )
            else:
                log.error(
                    "session ended with pages still in storage; it stays parked for the next wsd",
                    vm_id=session.vm_id,
                )
        self._status()
        log.info(
            "session closed",
            vm_id=session.vm_id,
            cycles=session.tracker.cycles,
            evicted=session.ctx.stats.evicted_pages,
            fetched=session.ctx.stats.fetched_pages,
        )


# How long a released uffd is still read (see VmTracker.release).
LINGER_SECONDS = 2.0
# How long a hand-off waits for the last session of its vm_id to end.
LAST_SESSION_WAIT_SECONDS = 10.0


async def _linger(tracker: VmTracker, memfds: list[int]) -> None:
    """Read a released uffd for a moment, then close it and the memfds."""
    loop = asyncio.get_running_loop()
    try:
        with contextlib.suppress(ValueError, OSError):
            loop.add_reader(tracker.uffd.fd, tracker.discard_pending)
        await asyncio.sleep(LINGER_SECONDS)
    finally:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(tracker.uffd.fd)
        try:
            tracker.close()
        finally:
            await _close_memfds(memfds)


async def _close_memfds(memfds: list[int]) -> None:
    """Close a session's memfds in a worker thread.

    Once the VMM has exited, wsd holds the last reference to the guest's memory, and
    the close frees all of it: about 80 ms per GiB of populated shmem on the
    development VM, which on the loop would hold up every other VM's faults.  Shielded:
    cancelled, the caller goes on, and the fds are closed all the same.
    """
    loop = asyncio.get_running_loop()
    await asyncio.shield(loop.run_in_executor(None, close_fds, memfds))


async def _prepare(session: Session) -> None:
    """Between windows: the evictor's prepare, an operator's one-shot eviction
    instead, or while eviction is paused only the evictor's repairs."""
    request = session.eviction
    if request is not None and request.prepared:
        # The window that just closed committed it.
        request.committed(session.ctx.stats)
        session.eviction = request = None
    if request is not None:
        await request.prepare(session.evictor)
        if request.done.done():  # nothing to evict: answered already
            session.eviction = None
    elif not session.paused:
        await session.evictor.prepare()
    else:
        await session.evictor.repair()


def run(settings: Settings, reload: Callable[[], Settings] | None = None) -> int:
    """``wsd run``: the daemon in the foreground until SIGTERM or SIGINT.

    ``reload`` builds new settings (re-reading the config file) on SIGHUP; if it
    raises, the error is logged and the running settings stay.
    """

    async def main() -> None:
        daemon = Daemon(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.stop)
        # Always handled: under systemd an unhandled SIGHUP (`systemctl reload`)
        # would kill wsd, and death by SIGHUP counts as a clean exit.
        loop.add_signal_handler(signal.SIGHUP, _reloader(daemon, reload))
        await daemon.run()

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    except (StartupError, StorageError) as e:
        log.error("wsd cannot start", error=str(e))
        return 2
    return 0


def _reloader(daemon: Daemon, reload: Callable[[], Settings] | None) -> Callable[[], None]:
    def on_sighup() -> None:
        sdnotify.reloading()
        if reload is None:
            log.warning("reload: wsd runs without --config, nothing to reload")
            sdnotify.ready("nothing to reload (no --config)")
            return
        try:
            new = reload()
        except Exception as e:  # a bad file must never take the daemon down
            log.error("reload rejected, the running configuration stays", error=str(e))
            sdnotify.ready(f"reload rejected: {e}")
            return
        daemon.reload(new)
        sdnotify.ready(f"reloaded; {len(daemon.sessions)} VMs")

    return on_sighup


async def _keep_alive(interval: float) -> None:
    """systemd's watchdog: ping from the event loop, so a stuck loop gets restarted."""
    while True:
        sdnotify.watchdog()
        await asyncio.sleep(interval)
