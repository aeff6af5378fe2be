"""A worker's view of its configuration file, re-read when the file changes (no restart needed)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from connector.config import Account, Config, enabled_by_name, load_config
from connector.errors import ConfigError

log = logging.getLogger(__name__)

_Stamp = tuple[int, int, int]


def _stamp(path: Path) -> _Stamp | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


def _stamps(config: Config) -> tuple[_Stamp | None, ...] | None:
    """The configuration file's stamp and its account files' (an edited accounts.csv is a change too)."""
    if config.source is None:
        return None
    return tuple(_stamp(path) for path in (config.source, *config.account_file_paths))


class ConfigWatch:
    """``current()`` is the newest valid configuration; a broken edit is logged and the old one kept.

    ``account(name)`` finds a poll job's account by name in it (a dict built once per configuration: with
    100,000 accounts, a scan of the list per poll cost more CPU than the idle poll itself). A poll and the
    registry's sync both read it, from different threads. Whoever notices a changed file re-reads it, but
    only ``refresh()`` reports (once) that the registry has not seen it yet: a poll that happened to notice
    the change first must not make the sync miss it.
    """

    def __init__(self, config: Config) -> None:
        self._config = config
        self._enabled = enabled_by_name(config)
        self._path = config.source
        self._stamp = _stamps(config)
        self._unsynced = False
        self._lock = threading.Lock()

    def current(self) -> Config:
        with self._lock:
            self._reread_if_changed()
            return self._config

    def account(self, name: str) -> tuple[Config, Account | None]:
        """The newest configuration and its enabled account ``name`` (None: not there or disabled)."""
        with self._lock:
            self._reread_if_changed()
            return self._config, self._enabled.get(name)

    def refresh(self) -> tuple[Config, bool]:
        """The configuration and whether it changed since the last ``refresh()`` (the registry's sync)."""
        with self._lock:
            self._reread_if_changed()
            changed, self._unsynced = self._unsynced, False
            return self._config, changed

    def _reread_if_changed(self) -> None:
        """Under ``_lock``: re-reads the file when it changed."""
        if self._path is None:
            return
        stamp = _stamps(self._config)
        if stamp is None or stamp[0] is None or stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            config = load_config(self._path)
        except ConfigError as exc:
            log.error("configuration changed but is not valid; keeping the previous one:\n%s", exc)
            return
        if config.service != self._config.service:
            log.warning("[service] changes take effect when the worker restarts")
        log.info("configuration reloaded from %s: %d accounts", self._path, len(config.accounts))
        if config.account_file_paths != self._config.account_file_paths:
            self._stamp = _stamps(config)  # other account files to watch from now on
        self._config, self._enabled = config, enabled_by_name(config)
        self._unsynced = True
