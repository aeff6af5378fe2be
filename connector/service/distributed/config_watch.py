"""A worker's view of its configuration file, re-read when the file changes (no restart needed)."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from connector.config import Config, load_config
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
    """``current()`` is the newest valid configuration; a broken edit is logged and the old one kept."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._path = config.source
        self._stamp = _stamps(config)
        self._lock = threading.Lock()

    def current(self) -> Config:
        return self.refresh()[0]

    def refresh(self) -> tuple[Config, bool]:
        """The configuration and whether it was re-read just now."""
        with self._lock:
            if self._path is None:
                return self._config, False
            stamp = _stamps(self._config)
            if stamp is None or stamp[0] is None or stamp == self._stamp:
                return self._config, False
            self._stamp = stamp
            try:
                config = load_config(self._path)
            except ConfigError as exc:
                log.error("configuration changed but is not valid; keeping the previous one:\n%s", exc)
                return self._config, False
            if config.service != self._config.service:
                log.warning("[service] changes take effect when the worker restarts")
            log.info("configuration reloaded from %s: %d accounts", self._path, len(config.accounts))
            if config.account_file_paths != self._config.account_file_paths:
                self._stamp = _stamps(config)  # other account files to watch from now on
            self._config = config
            return config, True
