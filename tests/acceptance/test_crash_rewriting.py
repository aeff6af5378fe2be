"""SIGKILL into destinations that do not store what they are given (issue 12.1), then reruns: each message
arrives exactly once. pymap drops the last line break of a message without body; the rewriting proxy in
front of Dovecot puts a header of its own first in every stored message. Either way the stored size and
SHA-256 are not the connector's, so only the stamp (``X-Pop-Connector-Id``) tells a copy apart.
"""

from __future__ import annotations

import re
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.acceptance.conftest import RunCli
from tests.delivery import assert_exactly_once, without_stamp
from tests.messages import simple
from tests.servers.dovecot import Dovecot, MailUsers
from tests.servers.imap_rewriter import ImapRewriter
from tests.servers.pymap import Pymap

pytestmark = pytest.mark.acceptance

PROXY_HEADER = b"X-Archived-By: rewriting test proxy\r\n"
_MESSAGE_ID_RE = re.compile(rb"^Message-ID:\s*(<[^>\r\n]*>)", re.IGNORECASE | re.MULTILINE)
# A batch is stored and the kill comes before its records; then a kill while recording recovered
# messages; then a batch again: three SIGKILLs, each leaving stored messages the ledger calls pending.
KILLS = [("after-multiappend", "1"), ("before-delivered-record", "2"), ("after-multiappend", "1")]


def messages() -> list[bytes]:
    """24 messages: every other one all header (pymap changes those), one without Message-ID."""
    return [
        simple(n).split(b"\r\n\r\n", 1)[0] + b"\r\n" if n % 2 == 0 else simple(n, message_id=n != 5)
        for n in range(24)
    ]


@contextmanager
def destination(
    kind: str, request: pytest.FixtureRequest, dovecot: Dovecot, mail_users: MailUsers
) -> Iterator[tuple[dict[str, object], Callable[[], list[bytes]]]]:
    """The destination fields for the config, and how to read back what it stored (without the stamp,
    and without the proxy's header)."""
    if kind == "pymap":
        pymap: Pymap = request.getfixturevalue("pymap")
        fields = {"host": pymap.host, "port": pymap.port, "username": pymap.user, "password": pymap.password}
        yield fields, lambda: [without_stamp(data) for data in pymap.stored()]
        return
    with ImapRewriter(dovecot.host, dovecot.ports.imap, add_header=PROXY_HEADER) as proxy:

        def stored() -> list[bytes]:
            data = [message.stored for message in dovecot.imap_fetch(mail_users.destination.name)]
            assert all(d.startswith(PROXY_HEADER) for d in data)
            return [without_stamp(d[len(PROXY_HEADER) :]) for d in data]

        yield {"port": proxy.port}, stored


@pytest.mark.parametrize("kind", ["pymap", "rewriting-proxy"])
def test_three_kills_into_a_rewriting_destination_then_each_message_once(
    request: pytest.FixtureRequest,
    dovecot: Dovecot,
    mail_users: MailUsers,
    write_cfg: Callable[..., Path],
    run_cli: RunCli,
    kind: str,
) -> None:
    originals = messages()
    dovecot.seed(mail_users.source.name, originals)
    with destination(kind, request, dovecot, mail_users) as (fields, stored):
        config = str(write_cfg(destination=fields))
        for point, nth in KILLS:
            crashed = run_cli(
                point, nth, "--", "--config", config, "sync", module="tests.acceptance.crash_driver"
            )
            assert crashed.returncode == -signal.SIGKILL, (point, crashed.stdout, crashed.stderr)
            assert len(stored()) <= len(originals)  # no duplicate at any point
        # The server deletes nothing before QUIT: nothing can be lost so far.
        assert dovecot.maildir_count(mail_users.source.name) == len(originals)
        rerun = run_cli("--config", config, "sync")
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert "recovered=0" not in rerun.stdout, rerun.stdout
        final = stored()
        again = run_cli("--config", config, "sync")
        assert again.returncode == 0 and "delivered=0 recovered=0" in again.stdout, again.stdout
    if kind == "pymap":
        assert final != originals  # pymap did change what it stored
        counts = Counter(_MESSAGE_ID_RE.search(m).group(1) for m in final)  # type: ignore[union-attr]
        assert len(final) == len(originals) and set(counts.values()) == {1}, counts
    else:
        assert_exactly_once(originals, final)
    assert dovecot.maildir_count(mail_users.source.name) == 0
