"""A worker's view of its configuration file, re-read when the file changes (no restart needed)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from connector.config import Account, Config, load_config
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


def _enabled_by_name(config: Config) -> dict[str, Account]:
    return {account.name: account for account in config.accounts if account.enabled}


class ConfigWatch:
    """``current()`` is the newest valid configuration; a broken edit is logged and the old one kept.
    ``account(name)`` finds a poll job's account by name in it (a dict built once per configuration: with
    100,000 accounts, a scan of the list per poll cost more CPU than the idle poll itself)."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._enabled = _enabled_by_name(config)
        self._path = config.source
        self._stamp = _stamps(config)
        self._lock = threading.Lock()

    def current(self) -> Config:
        return self.refresh()[0]

    def account(self, name: str) -> tuple[Config, Account | None]:
        """The newest configuration and its enabled account ``name`` (None: not there or disabled)."""
        with self._lock:
            config, enabled = self._refresh()
            return config, enabled.get(name)

    def refresh(self) -> tuple[Config, bool]:
        """The configuration and whether it was re-read just now."""
        with self._lock:
            before = self._config
            config, _ = self._refresh()
            return config, config is not before

    def _refresh(self) -> tuple[Config, dict[str, Account]]:
        """Under ``_lock``: re-reads the file when it changed; the configuration and its index."""
        if self._path is None:
            return self._config, self._enabled
        stamp = _stamps(self._config)
        if stamp is None or stamp[0] is None or stamp == self._stamp:
            return self._config, self._enabled
        self._stamp = stamp
        try:
            config = load_config(self._path)
        except ConfigError as exc:
            log.error("configuration changed but is not valid; keeping the previous one:\n%s", exc)
            return self._config, self._enabled
        if config.service != self._config.service:
            log.warning("[service] changes take effect when the worker restarts")
        log.info("configuration reloaded from %s: %d accounts", self._path, len(config.accounts))
        if config.account_file_paths != self._config.account_file_paths:
            self._stamp = _stamps(config)  # other account files to watch from now on
        self._config, self._enabled = config, _enabled_by_name(config)
        return self._config, self._enabled
