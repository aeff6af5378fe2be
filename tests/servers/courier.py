"""A real Courier-IMAP 5.0 and Courier POP3 1.0 running from a temp dir: the third real server of the
interoperability tests.

The binaries come from ``scripts/setup-courier`` (Debian's packages unpacked into ``.cache/courier``, since
they conflict with Dovecot's, and a stub ``libfam.so.0``); ``$COURIER_ROOT`` points elsewhere. Each server
is a ``couriertcpd`` started the way Debian's init scripts start it, with the settings of the packaged
``etc/courier/imapd`` and ``pop3d`` files as environment variables.

Logins: Courier asks authdaemond over the Unix socket ``/run/courier/authdaemon/socket``, a path compiled
into libcourierauth. Instead of the real authdaemond (and its configuration files under /etc), this module
serves that socket itself (``_AuthDaemon``, its line protocol) from a folder of the temp dir, and the
servers run in a private mount namespace (``unshare -m``) in which that folder is mounted on /run. That
needs root; without it (or where namespaces are not permitted) ``CourierUnavailable`` is raised.

Mail belongs to ``nobody`` and lives in ``<tmp>/home/<user>/Maildir``. Courier differs from Dovecot where
it matters to the connector: personal folders are ``INBOX.``-prefixed with "." as separator; there is no
MULTIAPPEND, LITERAL+ or UNSELECT; a folder selected read-only (EXAMINE) refuses APPEND in that session;
POP3 offers ``UTF8 USER`` and, until the client sends UTF8, serves a placeholder for a message with raw
UTF-8 headers.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imapclient import IMAPClient

from tests.servers.dovecot import HOST, MailUser, _free_ports, maildir_count
from tests.servers.readiness import unanswered

ROOT = Path(__file__).resolve().parents[2]
_START_TIMEOUT = 15.0
_CLIENT_TIMEOUT = 30.0
# Settings of Debian's etc/courier/imapd and pop3d that differ from the built-in defaults or matter here.
_ENVIRONMENT = {
    "IMAP_CAPABILITY": "IMAP4rev1 UIDPLUS CHILDREN NAMESPACE THREAD=ORDEREDSUBJECT THREAD=REFERENCES "
    "SORT QUOTA IDLE",
    "IMAP_KEYWORDS": "1",
    "IMAP_ACL": "1",
    "IMAP_IDLE_TIMEOUT": "60",
    "IMAP_MAILBOX_SANITY_CHECK": "1",
    "IMAP_DISABLETHREADSORT": "0",
    "IMAP_CHECK_ALL_FOLDERS": "0",
    "IMAP_OBSOLETE_CLIENT": "0",
    "IMAP_UMASK": "022",
    "IMAP_USELOCKS": "1",
    "IMAP_ENHANCEDIDLE": "0",
    "IMAP_TRASHFOLDERNAME": "Trash",
    "IMAP_EMPTYTRASH": "Trash:7",
    "IMAP_MOVE_EXPUNGE_TO_TRASH": "0",
    "HEADERFROM": "X-IMAP-Sender",
    "POP3AUTH": "",
    "MIME_UNICODE_MESSAGE_TYPE": "message/global",
}


class CourierError(RuntimeError):
    """The Courier test server could not be started or a helper could not talk to it."""


class CourierUnavailable(CourierError):
    """This machine cannot run Courier as the tests do (no root, or no private mount namespaces)."""


def courier_root() -> Path:
    return Path(os.environ.get("COURIER_ROOT", ROOT / ".cache" / "courier"))


def _mail_owner() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


class _AuthDaemon:
    """Serves authdaemond's socket: ``PRE . <service> <user>`` looks a user up, ``AUTH <length>\\n<service>\\n
    login\\n<user>\\n<password>\\n`` checks a password (courier-authlib's authdaemon protocol; the client may
    send ``NAME=value`` lines first). Answers ``UID=..``, ``GID=..``, ``HOME=..``, ``MAILDIR=..``... and a
    line ``.``, or ``FAIL``."""

    def __init__(self, path: Path, users: dict[str, MailUser], homes: Path) -> None:
        self.path = path
        self._users = users
        self._homes = homes
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        path.chmod(0o777)
        self._listener.listen(32)
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._stopping = threading.Event()
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(timeout=5)

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            try:
                while (answer := self._answer(data)) is None:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                conn.sendall(answer)
            except OSError:
                return

    def _answer(self, data: bytes) -> bytes | None:
        """The reply to the request in ``data``, or None while it is incomplete."""
        rest = data
        while b"\n" in rest:
            line, rest = rest.split(b"\n", 1)
            words = line.decode("utf-8", "replace").split(" ")
            if words[0] == "PRE" and len(words) == 4:
                return self._entry(words[3])
            if words[0] == "AUTH" and len(words) == 2 and words[1].isdigit():
                if len(rest) < int(words[1]):
                    return None
                fields = rest[: int(words[1])].decode("utf-8", "replace").split("\n")
                if len(fields) >= 4 and fields[1] == "login":
                    user = self._users.get(fields[2])
                    if user is not None and user.password == fields[3]:
                        return self._entry(user.name)
                return b"FAIL\n"
            if "=" not in line.decode("utf-8", "replace"):
                return b"FAIL\n"  # a request this stand-in does not know (ENUMERATE, PASSWD)
        return None

    def _entry(self, name: str) -> bytes:
        if name not in self._users:
            return b"FAIL\n"
        uid, gid = _mail_owner()
        home = self._homes / name
        return (
            # No USERNAME=: Courier would look that name up in /etc/passwd for the uid.
            f"UID={uid}\nGID={gid}\nHOME={home}\nADDRESS={name}\nMAILDIR={home / 'Maildir'}\n.\n"
        ).encode()


class Courier:
    """Courier-IMAP and Courier POP3 on free loopback ports (plain TCP), in a private mount namespace."""

    host = HOST
    separator = "."
    prefix = "INBOX."

    def __init__(self) -> None:
        self.base = courier_root() / "root"
        self.stub = courier_root() / "lib"
        if not (self.base / "usr" / "bin" / "imapd").exists() or not (self.stub / "libfam.so.0").exists():
            raise CourierError(
                f"Courier is not unpacked in {courier_root()}: run scripts/setup-courier (the "
                "interoperability tests need a real Courier and are not skipped without one)"
            )
        _check_namespaces()
        self.root = Path(tempfile.mkdtemp(prefix="courier-"))
        self.root.chmod(0o755)
        self.imap_port, self.pop3_port = _free_ports(4)[:2]
        self._users: dict[str, MailUser] = {}
        self._auth: _AuthDaemon | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._sequence = 0

    # --- lifecycle --------------------------------------------------------------------------------------

    def start(self) -> Courier:
        run = self.root / "run"
        (run / "courier" / "authdaemon").mkdir(parents=True)
        (self.root / "home").mkdir()
        self._auth = _AuthDaemon(run / "courier" / "authdaemon" / "socket", self._users, self.root / "home")
        self._spawn()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self) -> None:
        courier = self.base / "usr" / "lib" / "courier" / "courier"
        tcpd = shlex.quote(str(self.base / "usr" / "sbin" / "couriertcpd"))
        servers = [
            (self.imap_port, courier / "imaplogin", self.base / "usr" / "bin" / "imapd"),
            (self.pop3_port, courier / "courierpop3login", courier / "courierpop3d"),
        ]
        lines = [
            "set -e",
            # Inside the namespace only: the authdaemon socket appears where libcourierauth looks for it.
            f"mount --bind {shlex.quote(str(self.root / 'run'))} /run",
        ]
        for port, login, daemon in servers:
            lines.append(
                f"{tcpd} -address={HOST} -nodnslookup -noidentlookup -maxprocs=40 -maxperip=40 {port} "
                f"{shlex.quote(str(login))} {shlex.quote(str(daemon))} Maildir &"
            )
            # couriertcpd puts itself in a process group of its own (with the sessions it forks).
            lines.append(f"echo $! > {shlex.quote(str(self.root / f'tcpd-{port}.pid'))}")
        lines.append("wait")
        (self.root / "start.sh").write_text("\n".join(lines) + "\n")
        libraries = [self.stub, self.base / "usr" / "lib", self.base / "usr" / "lib" / "x86_64-linux-gnu"]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LD_LIBRARY_PATH": ":".join(str(path) for path in libraries),
            **_ENVIRONMENT,
        }
        with (self.root / "courier.out").open("ab") as output:
            self._process = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sh", str(self.root / "start.sh")],
                env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def _wait_ready(self) -> None:
        assert self._process is not None
        try:
            silent = unanswered(
                self._process, HOST, {self.imap_port: b"* OK", self.pop3_port: b"+OK"}, _START_TIMEOUT
            )
        except ChildProcessError as exc:
            raise CourierError(f"courier {exc}: {self.log_tail()}") from None
        if silent:
            raise CourierError(f"courier did not answer on {silent}: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.root / "courier.out"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no output)"

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            # Each couriertcpd with the sessions it forked; unshare's shell, waiting for them, then ends and
            # reaps them (killing it first would leave them to init as zombies for a while).
            groups = [
                int(text) for path in self.root.glob("tcpd-*.pid") if (text := path.read_text().strip())
            ]
            _signal_groups(groups, signal.SIGTERM)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                _signal_groups([*groups, process.pid], signal.SIGKILL)
                process.wait(10)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Courier:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- users ------------------------------------------------------------------------------------------

    def new_user(self, prefix: str) -> MailUser:
        user = MailUser(f"{prefix}{os.urandom(3).hex()}", f"pw-{os.urandom(8).hex()}")
        maildir = self.maildir(user.name)
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True)
        self._chown(maildir.parent)
        self._users[user.name] = user
        return user

    def maildir(self, user: str) -> Path:
        return self.root / "home" / user / "Maildir"

    def _chown(self, top: Path) -> None:
        uid, gid = _mail_owner()
        for path in [top, *top.rglob("*")]:
            os.chown(path, uid, gid)

    @contextlib.contextmanager
    def imap(self, user: str) -> Iterator[Any]:
        client = IMAPClient(HOST, port=self.imap_port, ssl=False, timeout=_CLIENT_TIMEOUT)
        try:
            client.login(user, self._users[user].password)
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.logout()

    # --- seeding and inspection -------------------------------------------------------------------------

    def seed(self, user: str, messages: list[bytes]) -> None:
        """Straight into the INBOX Maildir (its new/), which is also the POP3 maildrop. Files hold LF line
        endings, as Maildir does; Courier sends CRLF."""
        maildir = self.maildir(user)
        for message in messages:
            self._sequence += 1
            name = f"{int(time.time())}.M{self._sequence}P{os.getpid()}.courier-test"
            temporary = maildir / "tmp" / name
            temporary.write_bytes(message.replace(b"\r\n", b"\n"))
            os.chown(temporary, *_mail_owner())
            temporary.rename(maildir / "new" / name)

    def imap_messages(self, user: str, folder: str = "INBOX") -> list[bytes]:
        """Every message in ``folder`` (a server-side name, e.g. "INBOX.Imported.Hosted"), in UID order."""
        return [body for _date, body in self.imap_fetch(user, folder)]

    def imap_fetch(self, user: str, folder: str = "INBOX") -> list[tuple[Any, bytes]]:
        """(INTERNALDATE, content) of every message in ``folder``, in UID order; read-only."""
        with self.imap(user) as client:
            client.select_folder(folder, readonly=True)
            uids = sorted(client.search("ALL"))
            if not uids:
                return []
            data = client.fetch(uids, ["INTERNALDATE", "BODY.PEEK[]"])
        return [(data[uid][b"INTERNALDATE"], data[uid][b"BODY[]"]) for uid in uids]

    def maildir_count(self, user: str) -> int:
        return maildir_count(self.maildir(user))

    def folders(self, user: str) -> list[str]:
        with self.imap(user) as client:
            return sorted(name for _flags, _delim, name in client.list_folders())


def _signal_groups(groups: list[int], signum: signal.Signals) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signum)


def _check_namespaces() -> None:
    if os.geteuid() != 0:
        raise CourierUnavailable("Courier runs in a private mount namespace, which needs root")
    if shutil.which("unshare") is None:
        raise CourierUnavailable("unshare (util-linux) is missing")
    probe = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        reason = probe.stderr.decode(errors="replace").strip() or f"exit {probe.returncode}"
        raise CourierUnavailable(f"private mount namespaces are not permitted here: {reason}")
