"""A real Cyrus IMAP 3.6 (IMAP + POP3) running from a temp dir: the second, different server of the
interoperability tests.

The binaries come from ``scripts/setup-cyrus`` (Debian's packages unpacked into ``.cache/cyrus``, since
they conflict with Dovecot's); ``$CYRUS_ROOT`` points elsewhere. Users live in a sasldb; mailboxes are
created by an admin over IMAP. Cyrus differs from Dovecot where it matters to the connector: personal
folders are under ``INBOX/``, UIDLs look like ``1795670867.1``, and a full mailbox answers ``NO Over
quota`` without a response code.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imapclient import IMAPClient

from tests.delivery import without_stamp
from tests.servers.dovecot import HOST, MailUser, _free_ports
from tests.servers.readiness import unanswered

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "cyrusadmin"
_START_TIMEOUT = 15.0
_CLIENT_TIMEOUT = 30.0


class CyrusError(RuntimeError):
    """The Cyrus test server could not be started or a helper could not talk to it."""


def cyrus_root() -> Path:
    return Path(os.environ.get("CYRUS_ROOT", ROOT / ".cache" / "cyrus")) / "root"


def _run_user() -> str:
    # As root Cyrus switches to `cyrus_user`; there is no cyrus account here, so nobody it is.
    return "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name


class Cyrus:
    """One Cyrus master serving IMAP and POP3 on free loopback ports (plain TCP)."""

    host = HOST
    separator = "/"

    def __init__(self) -> None:
        self.bin = cyrus_root() / "usr" / "lib" / "cyrus" / "bin"
        self.lib = cyrus_root() / "usr" / "lib" / "x86_64-linux-gnu"
        if not (self.bin / "master").exists():
            raise CyrusError(
                f"Cyrus is not unpacked in {cyrus_root()}: run scripts/setup-cyrus (the interoperability "
                "tests need a real Cyrus and are not skipped without one)"
            )
        if shutil.which("saslpasswd2") is None:
            raise CyrusError("saslpasswd2 is missing: install sasl2-bin")
        self.root = Path(tempfile.mkdtemp(prefix="cyrus-"))
        self.root.chmod(0o755)
        self.imap_port, self.pop3_port = _free_ports(4)[:2]
        self._process: subprocess.Popen[bytes] | None = None
        self._passwords: dict[str, str] = {}

    # --- lifecycle --------------------------------------------------------------------------------------

    def _write_config(self) -> None:
        for sub in ("config", "spool", "sieve", "run"):
            (self.root / sub).mkdir(exist_ok=True)
        conf = self.root / "imapd.conf"
        conf.write_text(
            f"configdirectory: {self.root}/config\npartition-default: {self.root}/spool\n"
            f"sievedir: {self.root}/sieve\ncyrus_user: {_run_user()}\nadmins: {ADMIN}\n"
            "sasl_pwcheck_method: auxprop\nsasl_auxprop_plugin: sasldb\n"
            f"sasl_sasldb_path: {self.root}/sasldb2\n"
            "sasl_mech_list: PLAIN LOGIN\nallowplaintext: yes\naltnamespace: no\nunixhierarchysep: yes\n"
            f"popminpoll: 0\nsyslog_prefix: cyrustest\nmaster_pid_file: {self.root}/run/master.pid\n"
            f"mboxname_lockpath: {self.root}/run/lock\nproc_path: {self.root}/run/proc\n"
        )  # fmt: skip
        conf_arg = f"-C {conf}"
        (self.root / "cyrus.conf").write_text(
            "START {\n"
            f'  recover cmd="{self.bin}/ctl_cyrusdb -r {conf_arg}"\n'
            "}\nSERVICES {\n"
            f'  imap cmd="{self.bin}/imapd {conf_arg}" listen="{HOST}:{self.imap_port}" prefork=0\n'
            f'  pop3 cmd="{self.bin}/pop3d {conf_arg}" listen="{HOST}:{self.pop3_port}" prefork=0\n'
            "}\nEVENTS {\n}\nDAEMON {\n}\n"
        )

    def start(self) -> Cyrus:
        self._write_config()
        self._set_password(ADMIN, "admin-pw")
        self._chown()
        env = {**os.environ, "LD_LIBRARY_PATH": str(self.lib)}
        output = (self.root / "master.out").open("ab")
        with output:
            self._process = subprocess.Popen(
                [str(self.bin / "master"), "-C", str(self.root / "imapd.conf"), "-M",
                 str(self.root / "cyrus.conf"), "-D"],
                env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        try:
            silent = unanswered(
                self._process, HOST, {self.imap_port: b"* OK", self.pop3_port: b"+OK"}, _START_TIMEOUT
            )
        except ChildProcessError as exc:
            raise CyrusError(f"cyrus master {exc}: {self.log_tail()}") from None
        if silent:
            self.stop()
            raise CyrusError(f"cyrus did not answer on {silent}: {self.log_tail()}")

    def log_tail(self) -> str:
        path = self.root / "master.out"
        return path.read_text(errors="replace")[-2000:] if path.exists() else "(no output)"

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Cyrus:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _chown(self) -> None:
        entry = pwd.getpwnam(_run_user())
        for path in [self.root, *self.root.rglob("*")]:
            os.chown(path, entry.pw_uid, entry.pw_gid)

    # --- users ------------------------------------------------------------------------------------------

    def _set_password(self, name: str, password: str) -> None:
        result = subprocess.run(
            ["saslpasswd2", "-p", "-c", "-f", str(self.root / "sasldb2"), "-u", "", name],
            input=password.encode(),
            capture_output=True,
            check=False,
        )
        if result.returncode != 0:
            raise CyrusError(f"saslpasswd2 failed: {result.stderr.decode(errors='replace')}")
        self._passwords[name] = password
        if self._process is not None:
            self._chown()

    def new_user(self, prefix: str, *, quota_kb: int | None = None) -> MailUser:
        user = MailUser(f"{prefix}{os.urandom(3).hex()}", f"pw-{os.urandom(8).hex()}")
        self._set_password(user.name, user.password)
        with self._admin() as admin:
            _ok(admin.create(f"user/{user.name}"), "CREATE")
            if quota_kb is not None:
                _ok(admin.setquota(f"user/{user.name}", f"(STORAGE {quota_kb})"), "SETQUOTA")
        return user

    @contextlib.contextmanager
    def _admin(self) -> Iterator[imaplib.IMAP4]:
        admin = imaplib.IMAP4(HOST, self.imap_port, timeout=_CLIENT_TIMEOUT)
        try:
            _ok(admin.login(ADMIN, self._passwords[ADMIN]), "LOGIN")
            yield admin
        finally:
            with contextlib.suppress(Exception):
                admin.logout()

    @contextlib.contextmanager
    def imap(self, user: str) -> Iterator[Any]:
        client = IMAPClient(HOST, port=self.imap_port, ssl=False, timeout=_CLIENT_TIMEOUT)
        try:
            client.login(user, self._passwords[user])
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.logout()

    # --- seeding and inspection -------------------------------------------------------------------------

    def seed(self, user: str, messages: list[bytes]) -> None:
        """APPEND to the user's INBOX, which is also their POP3 maildrop."""
        with self.imap(user) as client:
            for message in messages:
                client.append("INBOX", message)

    def imap_messages(self, user: str, folder: str = "INBOX") -> list[bytes]:
        """Every message in ``folder`` (a server-side name, e.g. "INBOX/Imported/Hosted"), in UID order,
        without the connector's stamp line (as ``Dovecot.imap_messages``)."""
        with self.imap(user) as client:
            client.select_folder(folder, readonly=True)
            uids = sorted(client.search("ALL"))
            if not uids:
                return []
            data = client.fetch(uids, ["BODY.PEEK[]"])
        return [without_stamp(data[uid][b"BODY[]"]) for uid in uids]

    def folders(self, user: str) -> list[str]:
        with self.imap(user) as client:
            return sorted(name for _flags, _delim, name in client.list_folders())


def _ok(response: tuple[str, list[Any]], what: str) -> None:
    if response[0] != "OK":
        raise CyrusError(f"{what} failed: {response}")
