"""A real Dovecot (POP3 + IMAP) running from a temp dir, for integration tests.

Everything the server touches (config, TLS files, base_dir, state_dir, log, mail) lives in one temp dir, so
the system's /etc/dovecot and any system service are never involved. The server is started in the
foreground (``dovecot -F``) as our child, so stopping it is one SIGTERM and a wait.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

from imapclient import IMAPClient

from tests.delivery import stamp_of, without_stamp

HOST = "127.0.0.1"
# Dovecot's default for Maildir++; the tests spell nested folders with it ("Imported.Hosted").
SEPARATOR = "."
_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 10.0
_CLIENT_TIMEOUT = 30.0
_START_ATTEMPTS = 3
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_seed_counter = itertools.count(1)
_user_counter = itertools.count(1)


def maildir_count(maildir: Path) -> int:
    """The messages in a Maildir's new/ and cur/: the same names (before their flags) in two listings
    running. A server's session still ending (a QUIT not awaited) moves files from new/ to cur/ and
    renames them in cur/ to set flags; a file renamed while a directory is read may be listed twice or not
    at all (POSIX readdir), and stat-ing a name that was just renamed finds nothing: one such count gave 1
    of 2 messages."""
    listed: set[str] | None = None
    for _ in range(50):
        names = {
            entry.name.split(":", 1)[0]
            for sub in ("new", "cur")
            for entry in (maildir / sub).iterdir()
            if not entry.name.startswith(".")
        }
        if names == listed:
            return len(names)
        listed = names
        time.sleep(0.005)
    raise DovecotError(f"{maildir} keeps changing")


class DovecotError(RuntimeError):
    """The test server could not be started or a helper could not talk to it."""


class Ports(NamedTuple):
    pop3: int
    pop3s: int
    imap: int
    imaps: int


class ImapMessage(NamedTuple):
    """One stored message. ``body`` is what was stored less the connector's ``X-Pop-Connector-Id`` stamp
    line (README, "What changes in a delivered message"), so tests compare it with what was sent;
    ``stored`` is every byte, ``stamp`` the stamp's value (None: no stamp line)."""

    uid: int
    flags: tuple[bytes, ...]
    internal_date: datetime
    body: bytes
    stored: bytes = b""
    stamp: str | None = None


@dataclass(frozen=True)
class MailUser:
    name: str
    password: str


@dataclass(frozen=True)
class MailUsers:
    """A POP3 source user and an IMAP destination user on the same server, fresh for one test."""

    source: MailUser
    destination: MailUser


@dataclass
class _UserEntry:
    password: str
    quota: str | None
    userdb_fields: Mapping[str, str]


def _mail_owner() -> tuple[int, int]:
    # A userdb uid of 0 is refused, so when we are root the mail belongs to nobody.
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


def _free_ports(count: int) -> Ports:
    """Ports the kernel just handed out; a race with another process is caught by the start retry."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return Ports(*(sock.getsockname()[1] for sock in sockets))
    finally:
        for sock in sockets:
            sock.close()


def _run(args: list[str], *, cwd: Path) -> None:
    result = subprocess.run(args, cwd=cwd, capture_output=True, check=False)
    if result.returncode != 0:
        raise DovecotError(f"{' '.join(args)} failed: {result.stderr.decode(errors='replace')}")


def make_test_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost signed by it.

    Returns (ca_file, server_cert, server_key). Python checks the IP against subjectAltName, and newer
    OpenSSL/Python versions insist on key usage and key identifiers, hence the explicit extensions.
    """
    if shutil.which("openssl") is None:
        raise DovecotError("the openssl binary is missing: install the openssl package")
    ca_key, ca_file = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ext.write_text(
        "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _run(
        ["openssl", "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_file), "-days", "7",
         "-subj", "/CN=POP Connector test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        cwd=directory,
    )  # fmt: skip
    _run(
        ["openssl", "req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost"],
        cwd=directory,
    )
    _run(
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_file), "-CAkey", str(ca_key),
         "-CAcreateserial", "-out", str(cert), "-days", "7", "-extfile", str(ext)],
        cwd=directory,
    )  # fmt: skip
    return ca_file, cert, key


_LMTP_CONFIG = """
# LMTP on a Unix socket (base_dir/lmtp) for peers that deliver over it (fetchmail in bench/); the
# recipient's domain, if any, is ignored.
protocol lmtp {
  auth_username_format = %n
}
"""


def _oauth2_config(root: Path, introspection_url: str | None) -> tuple[str, str]:
    """(extra auth mechanisms, passdb block) that make Dovecot accept OAuth 2.0 bearer tokens.

    The ``oauth2`` passdb is consulted only for XOAUTH2/OAUTHBEARER (``mechanisms``), so passwords keep
    going to the passwd-file. It POSTs each token to the introspection URL (RFC 7662) and accepts it when
    the answer is active and names the login user. Dovecot 2.3.19 does not expand %variables in that
    URL: a ``%u`` there makes the auth process panic on an invalid URL.
    """
    if introspection_url is None:
        return "", ""
    settings = root / "dovecot-oauth2.conf.ext"
    settings.write_text(
        "introspection_mode = post\n"
        f"introspection_url = {introspection_url}\n"
        "username_attribute = username\n"
        "active_attribute = active\n"
        "active_value = true\n"
    )
    settings.chmod(0o644)
    passdb = f"""passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {settings}
}}
"""
    return " xoauth2 oauthbearer", passdb


# Dovecot's "high-performance mode" for POP3: login and pop3 processes serve one connection after another
# instead of one process forked per connection (every mail user here has the same uid, so a pop3 process
# may serve them all). The default forks two processes per connection and caps a 2-core machine at about
# 100-200 sessions a second, which hides what the client itself costs (bench scenario 5).
_REUSE_PROCESSES = """
service pop3-login {
  service_count = 0
  process_min_avail = 2
}
service pop3 {
  service_count = 0
  process_min_avail = 2
}
"""


def _config(
    root: Path,
    ports: Ports,
    cert: Path,
    key: Path,
    uid: int,
    gid: int,
    introspection_url: str | None = None,
    *,
    lmtp: bool = False,
    reuse_processes: bool = False,
) -> str:
    mechanisms, oauth2_passdb = _oauth2_config(root, introspection_url)
    protocols = "imap pop3 lmtp" if lmtp else "imap pop3"
    extra = (_LMTP_CONFIG if lmtp else "") + (_REUSE_PROCESSES if reuse_processes else "")
    return f"""\
# Written by tests/servers/dovecot.py; nothing from /etc/dovecot is read.
protocols = {protocols}
listen = {HOST}
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
auth_verbose = yes
# Failed-login tests must not sleep: no fixed delay per failure, and no anvil penalty (which grows
# to 15 s per attempt from one IP, and every test connects from 127.0.0.1).
auth_failure_delay = 0
disable_plaintext_auth = no
auth_mechanisms = plain login{mechanisms}
# Temp dirs are not under a "valid" uid range by default and nobody is 65534.
first_valid_uid = 1
last_valid_uid = 0
first_valid_gid = 1
mail_max_userip_connections = 1000
mail_location = maildir:~/Maildir
mail_fsync = never

ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}

namespace inbox {{
  inbox = yes
  separator = {SEPARATOR}
  prefix =
}}

# Master users (``Dovecot.master``) log in as any existing user: SASL PLAIN with the user as
# authorisation identity, or LOGIN "user*master". pass = yes: the user must exist in the passdb below.
auth_master_user_separator = *
passdb {{
  driver = passwd-file
  master = yes
  pass = yes
  args = scheme=PLAIN {root}/masters
}}
{oauth2_passdb}passdb {{
  driver = passwd-file
  args = scheme=PLAIN {root}/users/%u
}}
userdb {{
  driver = passwd-file
  args = {root}/users/%u
  default_fields = uid={uid} gid={gid} home={root}/mail/%u
}}

mail_plugins = $mail_plugins quota
protocol imap {{
  mail_plugins = $mail_plugins imap_quota
}}
plugin {{
  quota = count:User quota
  quota_vsizes = yes
}}

service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = {HOST}
    port = {ports.imap}
  }}
  inet_listener imaps {{
    address = {HOST}
    port = {ports.imaps}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {HOST}
    port = {ports.pop3}
  }}
  inet_listener pop3s {{
    address = {HOST}
    port = {ports.pop3s}
    ssl = yes
  }}
}}
{extra}"""


class Dovecot:
    """One Dovecot master serving POP3, POP3S, IMAP and IMAPS on free loopback ports.

    ``users`` maps name to password; ``quotas`` maps name to a storage limit such as ``"20K"``. More
    users can be added (and removed) while the server runs; each has a passwd-file of its own. With
    ``oauth2_introspection_url`` the server also accepts XOAUTH2 and OAUTHBEARER with bearer tokens that
    URL says are active for the user (``tests/servers/token_server.py``); passwords keep working.
    ``master`` is a master user who can log in as any user (SASL PLAIN authorisation identity, or the
    ``user*master`` login). ``reuse_processes``: Dovecot's high-performance mode for POP3 (see
    ``_REUSE_PROCESSES``), for benchmarks of many short sessions.
    """

    host = HOST
    separator = SEPARATOR

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        *,
        quotas: Mapping[str, str] | None = None,
        keep_files: bool = False,
        lmtp: bool = False,
        oauth2_introspection_url: str | None = None,
        reuse_processes: bool = False,
    ) -> None:
        self._binary = shutil.which("dovecot") or (
            "/usr/sbin/dovecot" if os.access("/usr/sbin/dovecot", os.X_OK) else None
        )
        if self._binary is None:
            raise DovecotError(
                "the dovecot binary was not found: install dovecot-core, dovecot-pop3d and dovecot-imapd "
                "(the integration tests need a real Dovecot and are not skipped without one)"
            )
        # pytest's tmp dirs are 0700 root-owned: Dovecot's unprivileged processes could not enter them.
        self.root = Path(tempfile.mkdtemp(prefix="dovecot-"))
        self.root.chmod(0o755)
        self.keep_files = keep_files
        # Needs dovecot-lmtpd; the socket is then ``lmtp_socket``.
        self.lmtp = lmtp
        self.reuse_processes = reuse_processes
        self.oauth2_introspection_url = oauth2_introspection_url
        self.conf = self.root / "dovecot.conf"
        self._passwd_dir = self.root / "users"
        self._mail = self.root / "mail"
        self._uid, self._gid = _mail_owner()
        self._users: dict[str, _UserEntry] = {}
        # The mtime (ns) last given to each user's passwd-file; kept after remove_user, because Dovecot
        # keeps what it read from a path, and a user added again under that name must still look new.
        self._passwd_mtimes: dict[str, int] = {}
        self.master = MailUser("connector-master", f"master-{secrets.token_hex(8)}")
        self._process: subprocess.Popen[bytes] | None = None
        self.ports = Ports(0, 0, 0, 0)
        try:
            self.ca_file, self._cert, self._key = make_test_ca(self.root)
            self._mail.mkdir()
            self._passwd_dir.mkdir()
            masters = self.root / "masters"
            masters.write_text(f"{self.master.name}:{{PLAIN}}{self.master.password}::::::\n")
            masters.chmod(0o644)
            os.chown(self._mail, self._uid, self._gid)
            for name, password in (users or {}).items():
                self.add_user(name, password, quota=(quotas or {}).get(name))
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise

    # --- lifecycle --------------------------------------------------------------------------------------

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the master and return once every listener answers (TLS ones with a full handshake)."""
        if self._process is not None:
            return
        failure = ""
        for _ in range(_START_ATTEMPTS):
            self.ports = _free_ports(4)
            self.conf.write_text(
                _config(
                    self.root,
                    self.ports,
                    self._cert,
                    self._key,
                    self._uid,
                    self._gid,
                    self.oauth2_introspection_url,
                    lmtp=self.lmtp,
                    reuse_processes=self.reuse_processes,
                )
            )
            self._spawn()
            failure = self._wait_ready()
            if not failure:
                return
            self._terminate()
            if "Address already in use" not in failure:
                break
        raise DovecotError(f"dovecot did not start: {failure}")

    @property
    def lmtp_socket(self) -> Path:
        return self.root / "run" / "lmtp"

    def stop(self) -> None:
        self._terminate()
        if not self.keep_files:
            shutil.rmtree(self.root, ignore_errors=True)

    def _spawn(self) -> None:
        assert self._binary is not None
        output = (self.root / "dovecot.stdout").open("ab")
        with output:
            self._process = subprocess.Popen(
                [self._binary, "-F", "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # The master started its own session, so its group is exactly the processes it spawned.
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(_STOP_TIMEOUT)

    def _wait_ready(self) -> str:
        """An empty string once all four listeners greet, else why not."""
        assert self._process is not None
        context = ssl.create_default_context(cafile=str(self.ca_file))
        pending = {
            self.ports.pop3: None,
            self.ports.imap: None,
            self.ports.pop3s: context,
            self.ports.imaps: context,
        }
        deadline = time.monotonic() + _START_TIMEOUT
        last_error = "timed out"
        while pending and time.monotonic() < deadline:
            if self._process.poll() is not None:
                return f"the master exited with {self._process.returncode}: {self.log_tail()}"
            for port, tls in list(pending.items()):
                try:
                    _read_greeting(port, tls)
                except OSError as exc:
                    last_error = f"port {port}: {exc}"
                else:
                    del pending[port]
            if pending:
                time.sleep(0.02)
        return "" if not pending else f"{last_error}; log: {self.log_tail()}"

    def log_tail(self, lines: int = 30) -> str:
        texts = []
        for name in ("dovecot.stdout", "dovecot.log"):
            path = self.root / name
            if path.exists():
                texts.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(texts)

    # --- users ------------------------------------------------------------------------------------------

    def add_user(
        self,
        name: str,
        password: str,
        quota: str | None = None,
        *,
        userdb_fields: Mapping[str, str] | None = None,
    ) -> None:
        """Add (or replace) a user; ``quota`` is a storage limit such as ``"20K"`` or ``"1M"``.

        ``userdb_fields`` override settings for this user only, e.g. ``{"quota_max_mail_size": "10K"}``
        makes a larger APPEND fail with ``NO [LIMIT]``.

        Each user has a passwd-file of its own (``users/<name>``): Dovecot checks a passwd-file for
        changes at most once a second, so a new line in a shared file could go unseen, while a new
        file is read at its first lookup. Replacing an existing user waits out that second. Dovecot
        re-reads the file only if its size or its mtime in whole seconds changed, so each version of
        a user's file gets a later mtime second than the one before (see ``_write_passwd``).
        """
        if not _NAME_RE.match(name):
            raise ValueError(f"user name {name!r} must match {_NAME_RE.pattern}")
        if ":" in password or "\n" in password:
            raise ValueError("a passwd-file password cannot contain ':' or a newline")
        fields = dict(userdb_fields or {})
        if any(re.search(r"[\s:]", f"{key}{value}") for key, value in fields.items()):
            raise ValueError("userdb fields cannot contain whitespace or ':'")
        replacing = name in self._users
        self._users[name] = _UserEntry(password, quota, fields)
        self._make_maildir(name)
        self._write_passwd(name)
        if replacing and self._process is not None:
            time.sleep(1.1)

    def new_user(
        self,
        prefix: str = "user",
        *,
        quota: str | None = None,
        userdb_fields: Mapping[str, str] | None = None,
    ) -> MailUser:
        """A user with a name no other test uses."""
        name = f"{prefix}{next(_user_counter)}-{secrets.token_hex(3)}"
        user = MailUser(name, f"pw-{secrets.token_hex(8)}")
        self.add_user(user.name, user.password, quota=quota, userdb_fields=userdb_fields)
        return user

    def remove_user(self, name: str) -> None:
        self._users.pop(name, None)
        (self._passwd_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self._mail / name, ignore_errors=True)

    def password(self, name: str) -> str:
        return self._users[name].password

    def _write_passwd(self, name: str) -> None:
        entry = self._users[name]
        fields = dict(entry.userdb_fields)
        if entry.quota:
            fields["quota_rule"] = f"*:storage={entry.quota}"
        extra = " ".join(f"userdb_{key}={value}" for key, value in fields.items())
        path = self._passwd_dir / name
        # Written aside and renamed so the auth process never reads a half-written file.
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(f"{name}:{{PLAIN}}{entry.password}::::::{extra}\n")
        tmp.chmod(0o644)
        # Dovecot compares (mtime in whole seconds, size) with what it read: "1K" replaced by "1M" in
        # the same second would look unchanged and the old quota would stay in force. So each version
        # gets an mtime at least one whole second after the previous one (in the future, if need be).
        mtime = time.time_ns()
        previous = self._passwd_mtimes.get(name)
        if previous is not None:
            mtime = max(mtime, (previous // 1_000_000_000 + 1) * 1_000_000_000)
        os.utime(tmp, ns=(mtime, mtime))
        self._passwd_mtimes[name] = mtime
        os.replace(tmp, path)

    def maildir(self, user: str) -> Path:
        return self._mail / user / "Maildir"

    def _make_maildir(self, user: str) -> None:
        home = self._mail / user
        for path in (home, home / "Maildir", *(home / "Maildir" / sub for sub in ("cur", "new", "tmp"))):
            path.mkdir(exist_ok=True)
            os.chown(path, self._uid, self._gid)

    # --- seeding and inspection -------------------------------------------------------------------------

    def seed(self, user: str, messages: list[bytes]) -> None:
        """Put messages into the user's INBOX by writing Maildir files (much faster than doveadm save).

        Dovecot stores LF line endings and trusts the S= size in the file name; a wrong S= makes POP3
        answer -ERR [SYS/TEMP].
        """
        maildir = self.maildir(user)
        for message in messages:
            data = message.replace(b"\r\n", b"\n")
            base = f"{int(time.time())}.M{next(_seed_counter)}P{os.getpid()}.pytest,S={len(data)}"
            tmp = maildir / "tmp" / base
            tmp.write_bytes(data)
            os.chown(tmp, self._uid, self._gid)
            # Into new/ by rename so Dovecot never sees a half-written message.
            os.rename(tmp, maildir / "new" / base)

    def maildir_count(self, user: str) -> int:
        """Messages left in the user's INBOX (the POP3 maildrop), read from disk."""
        return maildir_count(self.maildir(user))

    def maildir_messages(self, user: str) -> list[bytes]:
        """The raw files of the user's INBOX (LF line endings, as Dovecot stores them)."""
        maildir = self.maildir(user)
        for _ in range(10):
            try:
                return [
                    entry.read_bytes()
                    for sub in ("new", "cur")
                    for entry in sorted((maildir / sub).iterdir())
                ]
            except FileNotFoundError:
                time.sleep(0.05)  # Dovecot moved a file from new/ to cur/ while we listed
        raise DovecotError(f"the maildir of {user} keeps changing")

    def pop3_contents(self, user: str) -> list[bytes]:
        """Every message exactly as Dovecot's POP3 sends it (dot-unstuffed, terminator removed), read with
        a minimal client of its own so that the connector's POP3 code is not its own oracle."""
        with socket.create_connection((self.host, self.ports.pop3), timeout=_CLIENT_TIMEOUT) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            sock.sendall(f"USER {user}\r\nPASS {self.password(user)}\r\nSTAT\r\n".encode())
            for _ in range(2):
                reader.readline()
            count = int(reader.readline().split()[1])
            contents = []
            for number in range(1, count + 1):
                sock.sendall(f"RETR {number}\r\n".encode())
                assert reader.readline().startswith(b"+OK")
                lines = []
                while (line := reader.readline()) != b".\r\n":
                    lines.append(line[1:] if line.startswith(b"..") else line)
                contents.append(b"".join(lines))
            sock.sendall(b"QUIT\r\n")
        return contents

    @contextlib.contextmanager
    def imap(self, user: str) -> Iterator[Any]:
        """A logged-in imapclient connection on the plain port, returning aware INTERNALDATEs."""
        client = IMAPClient(self.host, port=self.ports.imap, ssl=False, timeout=_CLIENT_TIMEOUT)
        try:
            client.login(user, self.password(user))
            client.normalise_times = False
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.logout()

    def imap_fetch(self, user: str, folder: str = "INBOX") -> list[ImapMessage]:
        """Every message in ``folder`` (a server-side name, e.g. "Imported.Hosted"), in UID order.

        Uses EXAMINE and BODY.PEEK so that looking does not change \\Seen. ``\\Recent`` is left out of
        the flags: it is a property of the session, not of the message.
        """
        with self.imap(user) as client:
            client.select_folder(folder, readonly=True)
            uids = sorted(client.search("ALL"))
            if not uids:
                return []
            data = client.fetch(uids, ["FLAGS", "INTERNALDATE", "BODY.PEEK[]"])
        return [
            ImapMessage(
                uid,
                tuple(flag for flag in data[uid][b"FLAGS"] if flag != b"\\Recent"),
                data[uid][b"INTERNALDATE"],
                without_stamp(data[uid][b"BODY[]"]),
                data[uid][b"BODY[]"],
                stamp_of(data[uid][b"BODY[]"]),
            )
            for uid in uids
        ]

    def imap_messages(self, user: str, folder: str = "INBOX") -> list[bytes]:
        return [message.body for message in self.imap_fetch(user, folder)]

    def folders(self, user: str) -> list[str]:
        with self.imap(user) as client:
            return sorted(name for _flags, _delim, name in client.list_folders())

    def doveadm(
        self, *args: str, input: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """Run doveadm against this server (it needs -c, or it would read /etc/dovecot)."""
        result = subprocess.run(
            ["doveadm", "-c", str(self.conf), *args], input=input, capture_output=True, check=False
        )
        if check and result.returncode != 0:
            stderr = result.stderr.decode(errors="replace")
            raise DovecotError(f"doveadm {' '.join(args)} exited {result.returncode}: {stderr}")
        return result


@contextlib.contextmanager
def running_for_tests(**kwargs: Any) -> Iterator[Dovecot]:
    """A running Dovecot for a fixture; a missing or broken server fails the test (never skips it)."""
    import pytest

    try:
        server = Dovecot(**kwargs)
    except DovecotError as exc:
        pytest.fail(f"cannot run the Dovecot test server: {exc}", pytrace=False)
    try:
        server.start()
    except DovecotError as exc:
        server.stop()
        pytest.fail(f"cannot run the Dovecot test server: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def fresh_users(server: Dovecot) -> Iterator[MailUsers]:
    """A new POP3 source user and IMAP destination user, removed (with their mail) afterwards."""
    users = MailUsers(source=server.new_user("src"), destination=server.new_user("dst"))
    try:
        yield users
    finally:
        server.remove_user(users.source.name)
        server.remove_user(users.destination.name)


def _read_greeting(port: int, context: ssl.SSLContext | None) -> bytes:
    with socket.create_connection((HOST, port), timeout=2.0) as raw:
        if context is None:
            return _read_line(raw)
        with context.wrap_socket(raw, server_hostname=HOST) as tls:
            return _read_line(tls)


def _read_line(sock: socket.socket) -> bytes:
    with sock.makefile("rb") as reader:
        line = reader.readline()
    if not line.startswith((b"+OK", b"* OK")):
        raise ConnectionError(f"unexpected greeting {line!r}")
    return line
