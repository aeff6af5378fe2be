"""fetchmail delivering over LMTP into Dovecot: a second, optional baseline (only where installed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.servers.dovecot import Dovecot, MailUser

LMTP_MODULE = Path("/usr/lib/dovecot/lmtp")


def available() -> bool:
    return shutil.which("fetchmail") is not None and LMTP_MODULE.exists()


def move_all(dovecot: Dovecot, source: MailUser, destination: MailUser, workdir: Path) -> float:
    """Seconds fetchmail takes to move (and delete) every message of ``source`` into ``destination``."""
    home = workdir / f"fetchmail-{source.name}"
    home.mkdir()
    rc = home / "fetchmailrc"
    rc.write_text(
        "set no bouncemail\n"
        f"poll {dovecot.host} port {dovecot.ports.pop3} protocol pop3\n"
        f'  user "{source.name}" password "{source.password}" is "{destination.name}" here\n'
        f'  smtphost "{dovecot.lmtp_socket}" lmtp smtpname "{destination.name}"\n'
        '  no keep fetchall sslproto ""\n'
    )
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(home), "FETCHMAILHOME": str(home)}
    start = time.perf_counter()
    result = subprocess.run(
        ["fetchmail", "-f", str(rc), "--nosyslog", "--pidfile", str(home / "pid"), "-s"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    seconds = time.perf_counter() - start
    if result.returncode not in (0, 1):  # 1: no mail, which a benchmark never expects but is no error
        raise RuntimeError(f"fetchmail exited {result.returncode}: {result.stderr.strip()[-500:]}")
    return seconds
