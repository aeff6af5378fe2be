"""``pop-connector run``: the scheduler, the operations listener, and signals (TERM/INT stop, HUP reload)."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

from connector.cli.report import log_poll_line
from connector.config import Config, load_config
from connector.connections import Connections
from connector.errors import ConfigError
from connector.ledger.store import Ledger
from connector.ops.observers import operations_listener, standard_observers
from connector.poll.engine import SyncEngine
from connector.poll.probe import IdleProbe
from connector.poll.result import PollResult
from connector.service.reload import service_changes
from connector.service.scheduler import Service

log = logging.getLogger("connector")

# [service] settings a running service cannot change; a reload keeps the old values and says so.
RESTART_ONLY = ("database", "max_workers", "metrics")


def _log_result(result: PollResult) -> None:
    log_poll_line(log, result)


class Runtime:
    def __init__(
        self,
        config: Config,
        ledger: Ledger,
        config_file: Path,
        connections: Connections | None = None,
        *,
        poll_now: bool = False,
    ) -> None:
        self.config_file = config_file
        self.poll_now = poll_now
        observers = standard_observers()
        self.metrics = observers.metrics
        self.health = observers.health
        engine = SyncEngine(config, ledger, connections, observers=observers.all())
        self.service = Service(
            config,
            engine,
            ledger,
            on_result=_log_result,
            on_lag=observers.metrics.observe_lag,
            probe=IdleProbe(engine, at_once=config.service.max_workers),
        )
        self.reload_requested = threading.Event()
        self.server = operations_listener(lambda: self.service.config, ledger, observers)

    def install_signal_handlers(self) -> None:
        def stop(signum: int, _frame: FrameType | None) -> None:
            log.warning(
                "received %s: finishing the current message of each poll, then stopping",
                signal.Signals(signum).name,
            )
            self.service.stop.set()

        def reload(_signum: int, _frame: FrameType | None) -> None:
            self.reload_requested.set()  # handled by the main loop, not inside the signal handler

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, reload)

    def run(self) -> None:
        self.service.start(poll_now=self.poll_now)
        self._configure_health()
        if self.server is not None:
            self.server.start()
        try:
            while not self.service.stop.wait(0.5):
                if self.reload_requested.is_set():
                    self.reload_requested.clear()
                    self.reload()
        finally:
            self.service.shutdown()
            if self.server is not None:
                self.server.stop()

    def _configure_health(self) -> None:
        names = [account.name for account in self.service.accounts()]
        self.health.configure(names, self.service.scheduled())

    def reload(self) -> None:
        """Re-read the configuration file; on any error keep running with the current one."""
        log.info("reloading the configuration from %s", self.config_file)
        try:
            new = load_config(self.config_file)
        except ConfigError as exc:
            log.error("reload failed, still running with the previous configuration:\n%s", exc)
            return
        old = self.service.config
        ignored = [key for key in service_changes(old, new) if key in RESTART_ONLY]
        if ignored:
            log.warning(
                "reload: service.%s changed; restart the service to apply it", ", service.".join(ignored)
            )
            kept = {key: getattr(old.service, key) for key in RESTART_ONLY}
            new = new.model_copy(update={"service": new.service.model_copy(update=kept)})
        changes = self.service.reload(new)
        for name in changes.removed:
            self.metrics.forget(name)
        self._configure_health()
        log.info("configuration reloaded: %s", changes)


def run_service(config: Config, ledger: Ledger, config_file: Path, *, poll_now: bool = False) -> None:
    runtime = Runtime(config, ledger, config_file, poll_now=poll_now)
    runtime.install_signal_handlers()
    runtime.run()
