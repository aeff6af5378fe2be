"""The Gmail API test server and the token server's Google grants, driven with plain ``requests`` as a
client would: if these hold, the destination's and the authorize command's tests stand on a server that
answers as Google documents it."""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import requests

from tests.servers.gmail import INSERT, LABELS, METADATA, READONLY, UPLOAD_GRANULARITY, GmailServer
from tests.servers.token_server import JWT_BEARER, pkce_pair

pytestmark = pytest.mark.integration

ALICE = "alice@example.com"
BOB = "bob@example.com"
MESSAGE = (
    b"Received: from pop.example.net by mx.example.net; Tue, 3 Jun 2025 08:01:05 +0000\r\n"
    b"X-Pop-Connector-Id: c1-42\r\n"
    b"From: Carol <carol@example.net>\r\n"
    b"To: alice@example.com\r\n"
    b"Subject: hello\r\n"
    b"Date: Tue, 3 Jun 2025 07:58:00 +0000\r\n"
    b"Message-ID: <m1@example.net>\r\n"
    b"\r\n"
    b"Hello Alice.\r\n"
)


@pytest.fixture
def gmail() -> Iterator[GmailServer]:
    with GmailServer() as server:
        server.add_user(ALICE)
        server.add_user(BOB)
        yield server


@pytest.fixture
def http(gmail: GmailServer) -> Iterator[requests.Session]:
    with requests.Session() as session:
        # REQUESTS_CA_BUNDLE in the environment would override session.verify.
        session.trust_env = False
        session.verify = str(gmail.ca_file)
        yield session


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upload_url(gmail: GmailServer, user: str = "me") -> str:
    return f"{gmail.api_url}/upload/gmail/v1/users/{user}/messages/import"


def api(gmail: GmailServer, path: str, user: str = "me") -> str:
    return f"{gmail.api_url}/gmail/v1/users/{user}/{path}"


def message(number: int, size: int = 0) -> bytes:
    body = b"x" * size
    return MESSAGE.replace(b"<m1@", f"<m{number}@".encode()) + body


# --- import -------------------------------------------------------------------------------------------------


def test_media_upload_stores_gmails_copy_and_records_the_bytes_sent(
    gmail: GmailServer, http: requests.Session
) -> None:
    token = gmail.token(ALICE)
    params = {"uploadType": "media", "internalDateSource": "dateHeader", "neverMarkSpam": "true"}
    headers = {**bearer(token), "Content-Type": "message/rfc822"}
    answer = http.post(upload_url(gmail), params=params, data=MESSAGE, headers=headers)
    assert answer.status_code == 200, answer.text
    resource = answer.json()
    assert set(resource) == {"id", "threadId", "labelIds"} and resource["labelIds"] == []

    (record,) = gmail.imports_for(ALICE)
    assert record.data == MESSAGE and record.upload_type == "media"
    assert record.params["neverMarkSpam"] == "true"
    stored = record.message
    assert stored.raw != MESSAGE and stored.raw.endswith(MESSAGE)
    assert stored.raw.startswith(b"Received: from 127.0.0.1 named unknown by gmailapi.google.com")
    assert stored.internal_date == 1748937480000  # the Date header

    raw = http.get(api(gmail, f"messages/{resource['id']}"), params={"format": "raw"}, headers=bearer(token))
    assert base64.urlsafe_b64decode(raw.json()["raw"]) == stored.raw


def test_multipart_upload_with_labels(gmail: GmailServer, http: requests.Session) -> None:
    label = gmail.add_label(ALICE, "Hosted/alice")
    boundary = "==b0undary=="
    metadata = json.dumps({"labelIds": ["INBOX", "UNREAD", label.id]}).encode()
    body = (
        f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n".encode()
        + metadata
        + f"\r\n--{boundary}\r\nContent-Type: message/rfc822\r\n\r\n".encode()
        + MESSAGE
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {**bearer(gmail.token(ALICE)), "Content-Type": f'multipart/related; boundary="{boundary}"'}
    answer = http.post(upload_url(gmail), params={"uploadType": "multipart"}, data=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["labelIds"] == ["INBOX", "UNREAD", label.id]
    (record,) = gmail.imports
    assert record.data == MESSAGE and record.label_ids == ["INBOX", "UNREAD", label.id]
    assert gmail.label_names(ALICE, record.message) == ["INBOX", "UNREAD", "Hosted/alice"]


@pytest.mark.parametrize("base64_part", [False, True])
def test_multipart_with_bare_line_feeds(
    gmail: GmailServer, http: requests.Session, base64_part: bool
) -> None:
    """As other client libraries write it: LF line ends around the parts, the message as is or in base64."""
    media = base64.encodebytes(MESSAGE) if base64_part else MESSAGE
    encoding = b"Content-Transfer-Encoding: base64\n" if base64_part else b""
    body = (
        b"--b\nContent-Type: application/json\n\n{}\n--b\nContent-Type: message/rfc822\n"
        + encoding
        + b"\n"
        + media
        + b"\n--b--"
    )
    headers = {**bearer(gmail.token(ALICE)), "Content-Type": "multipart/related; boundary=b"}
    answer = http.post(upload_url(gmail), params={"uploadType": "multipart"}, data=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert gmail.imports[0].data == MESSAGE


def test_headers_that_are_not_utf8_come_back_as_text(gmail: GmailServer, http: requests.Session) -> None:
    data = MESSAGE.replace(b"Subject: hello", b"Subject: caf\xe9")
    message_id = import_media(gmail, http, ALICE, data)
    got = http.get(
        api(gmail, f"messages/{message_id}"),
        params={"format": "metadata", "metadataHeaders": "subject"},
        headers=bearer(gmail.token(ALICE, READONLY)),
    )
    assert got.json()["payload"]["headers"] == [{"name": "Subject", "value": "caf\ufffd"}]
    assert gmail.imports[0].data == data


def test_unknown_label_and_wrong_media_type_are_refused(gmail: GmailServer, http: requests.Session) -> None:
    token = gmail.token(ALICE)
    answer = http.post(
        f"{gmail.api_url}/gmail/v1/users/me/messages/import",
        json={"raw": base64.urlsafe_b64encode(MESSAGE).decode(), "labelIds": ["Label_404"]},
        headers=bearer(token),
    )
    assert answer.status_code == 400 and answer.json()["error"]["errors"][0]["reason"] == "invalidArgument"
    answer = http.post(
        upload_url(gmail),
        params={"uploadType": "media"},
        data=MESSAGE,
        headers={**bearer(token), "Content-Type": "text/plain"},
    )
    assert answer.status_code == 400 and "message/*" in answer.json()["error"]["message"]
    assert gmail.imports == []


def test_resumable_upload_in_chunks(gmail: GmailServer, http: requests.Session) -> None:
    data = message(7, size=UPLOAD_GRANULARITY * 2 + 1000)
    start = http.post(
        upload_url(gmail),
        params={"uploadType": "resumable", "internalDateSource": "receivedTime"},
        json={"labelIds": ["INBOX"]},
        headers={
            **bearer(gmail.token(ALICE)),
            "X-Upload-Content-Type": "message/rfc822",
            "X-Upload-Content-Length": str(len(data)),
        },
    )
    assert start.status_code == 200, start.text
    session = start.headers["Location"]
    assert "upload_id=" in session

    def put(first: int, chunk: bytes) -> requests.Response:
        last = first + len(chunk) - 1
        return http.put(session, data=chunk, headers={"Content-Range": f"bytes {first}-{last}/{len(data)}"})

    # A chunk that is not a whole number of 256 KiB units: the server keeps the whole units only.
    answer = put(0, data[: UPLOAD_GRANULARITY + 10])
    assert answer.status_code == 308 and answer.headers["Range"] == f"bytes=0-{UPLOAD_GRANULARITY - 1}"
    status = http.put(session, headers={"Content-Range": f"bytes */{len(data)}"})
    assert status.status_code == 308 and status.headers["Range"] == f"bytes=0-{UPLOAD_GRANULARITY - 1}"
    answer = put(UPLOAD_GRANULARITY, data[UPLOAD_GRANULARITY : UPLOAD_GRANULARITY * 2])
    assert answer.status_code == 308
    answer = put(UPLOAD_GRANULARITY * 2, data[UPLOAD_GRANULARITY * 2 :])
    assert answer.status_code == 200, answer.text
    assert answer.json()["labelIds"] == ["INBOX"]

    (record,) = gmail.imports
    assert record.data == data and record.upload_type == "resumable"
    assert record.params["internalDateSource"] == "receivedTime"
    # Asking again after the end answers the result and imports nothing more.
    again = http.put(session, headers={"Content-Range": f"bytes */{len(data)}"})
    assert again.status_code == 200 and again.json()["id"] == record.message.id
    assert len(gmail.imports) == 1


def start_resumable(gmail: GmailServer, http: requests.Session, data: bytes) -> str:
    start = http.post(
        upload_url(gmail),
        params={"uploadType": "resumable"},
        headers={**bearer(gmail.token(ALICE)), "X-Upload-Content-Length": str(len(data))},
    )
    assert start.status_code == 200, start.text
    return start.headers["Location"]


def test_lost_response_to_the_last_chunk_and_the_status_query(
    gmail: GmailServer, http: requests.Session
) -> None:
    data = message(3)
    session = start_resumable(gmail, http, data)
    gmail.lose_response("upload")
    with pytest.raises(requests.ConnectionError):
        http.put(session, data=data)
    # The upload is complete: a status query answers the message, and nothing is imported twice.
    status = http.put(session, headers={"Content-Range": f"bytes */{len(data)}"})
    assert status.status_code == 200
    assert status.json()["id"] == gmail.messages(ALICE)[0].id and len(gmail.imports) == 1


def test_resumable_chunk_failures(gmail: GmailServer, http: requests.Session) -> None:
    data = message(4, size=UPLOAD_GRANULARITY)
    session = start_resumable(gmail, http, data)
    gmail.server_error("upload", status=503)
    first = data[:UPLOAD_GRANULARITY]
    range_header = {"Content-Range": f"bytes 0-{UPLOAD_GRANULARITY - 1}/{len(data)}"}
    assert http.put(session, data=first, headers=range_header).status_code == 503
    status = http.put(session, headers={"Content-Range": f"bytes */{len(data)}"})
    assert status.status_code == 308 and "Range" not in status.headers  # nothing kept yet
    assert http.put(session, data=first, headers=range_header).status_code == 308
    # A chunk past what the server has is refused; one that overlaps is taken from where it stands.
    gap = http.put(
        session, data=data[-10:], headers={"Content-Range": f"bytes {len(data) - 10}-{len(data) - 1}/*"}
    )
    assert gap.status_code == 400
    overlap = {"Content-Range": f"bytes {UPLOAD_GRANULARITY - 5}-{len(data) - 1}/{len(data)}"}
    assert http.put(session, data=data[UPLOAD_GRANULARITY - 5 :], headers=overlap).status_code == 200
    assert gmail.imports[0].data == data
    gmail.expire_upload_sessions()
    assert http.put(session, headers={"Content-Range": f"bytes */{len(data)}"}).status_code == 404


def test_too_large_is_refused(http: requests.Session) -> None:
    with GmailServer(max_message_size=1000) as gmail:
        gmail.add_user(ALICE)
        http.verify = str(gmail.ca_file)
        headers = {**bearer(gmail.token(ALICE)), "Content-Type": "message/rfc822"}
        answer = http.post(
            upload_url(gmail), params={"uploadType": "media"}, data=message(1, 2000), headers=headers
        )
        assert answer.status_code == 413
        assert answer.json()["error"]["errors"][0]["reason"] == "uploadTooLarge"
        start = http.post(
            upload_url(gmail),
            params={"uploadType": "resumable"},
            headers={**bearer(gmail.token(ALICE)), "X-Upload-Content-Length": "5000"},
        )
        assert start.status_code == 413
        assert gmail.imports == []


def test_spam_classification_and_never_mark_spam(gmail: GmailServer, http: requests.Session) -> None:
    gmail.spam = lambda data: b"hello" in data
    headers = {**bearer(gmail.token(ALICE)), "Content-Type": "message/rfc822"}
    for number, never in ((1, "false"), (2, "true")):
        http.post(
            upload_url(gmail),
            params={"uploadType": "media", "neverMarkSpam": never},
            data=message(number),
            headers=headers,
        )
    # (a media upload carries no labels; the classifier adds SPAM)
    assert [m.label_ids for m in gmail.messages(ALICE)] == [["SPAM"], []]


# --- finding a message again --------------------------------------------------------------------------------


def import_media(gmail: GmailServer, http: requests.Session, user: str, data: bytes) -> str:
    answer = http.post(
        upload_url(gmail),
        params={"uploadType": "media"},
        data=data,
        headers={**bearer(gmail.token(user)), "Content-Type": "message/rfc822"},
    )
    assert answer.status_code == 200, answer.text
    return str(answer.json()["id"])


def test_list_by_rfc822msgid_and_read_a_header(gmail: GmailServer, http: requests.Session) -> None:
    ids = [import_media(gmail, http, ALICE, message(n)) for n in range(1, 4)]
    token = gmail.token(ALICE, READONLY)
    found = http.get(
        api(gmail, "messages"), params={"q": "rfc822msgid:<m2@example.net>"}, headers=bearer(token)
    )
    assert found.json() == {"messages": [{"id": ids[1], "threadId": ids[1]}], "resultSizeEstimate": 1}
    nothing = http.get(
        api(gmail, "messages"), params={"q": "rfc822msgid:m9@example.net"}, headers=bearer(token)
    )
    assert nothing.json() == {"resultSizeEstimate": 0}

    got = http.get(
        api(gmail, f"messages/{ids[1]}"),
        params=[
            ("format", "metadata"),
            ("metadataHeaders", "X-Pop-Connector-Id"),
            ("metadataHeaders", "Message-ID"),
        ],
        headers=bearer(token),
    ).json()
    assert got["payload"]["headers"] == [
        {"name": "X-Pop-Connector-Id", "value": "c1-42"},
        {"name": "Message-ID", "value": "<m2@example.net>"},
    ]

    # Pages: newest first (they share a Date, so by id), two at a time.
    first = http.get(api(gmail, "messages"), params={"maxResults": 2}, headers=bearer(token)).json()
    second = http.get(
        api(gmail, "messages"),
        params={"maxResults": 2, "pageToken": first["nextPageToken"]},
        headers=bearer(token),
    ).json()
    assert [m["id"] for m in first["messages"] + second["messages"]] == ids[::-1]
    assert "nextPageToken" not in second


def test_spam_is_found_only_when_asked(gmail: GmailServer, http: requests.Session) -> None:
    gmail.spam = lambda data: True
    import_media(gmail, http, ALICE, MESSAGE)
    token = bearer(gmail.token(ALICE, READONLY))
    query = {"q": "rfc822msgid:m1@example.net"}
    assert http.get(api(gmail, "messages"), params=query, headers=token).json()["resultSizeEstimate"] == 0
    with_spam = http.get(api(gmail, "messages"), params={**query, "includeSpamTrash": "true"}, headers=token)
    assert with_spam.json()["resultSizeEstimate"] == 1


def test_metadata_scope_restrictions(gmail: GmailServer, http: requests.Session) -> None:
    message_id = import_media(gmail, http, ALICE, MESSAGE)
    token = bearer(gmail.token(ALICE, METADATA))
    assert http.get(api(gmail, "messages"), params={"q": "rfc822msgid:x"}, headers=token).status_code == 403
    raw = http.get(api(gmail, f"messages/{message_id}"), params={"format": "raw"}, headers=token)
    assert raw.status_code == 403
    metadata = http.get(api(gmail, f"messages/{message_id}"), params={"format": "metadata"}, headers=token)
    assert metadata.status_code == 200


# --- labels and profile -------------------------------------------------------------------------------------


def test_labels_list_and_create(gmail: GmailServer, http: requests.Session) -> None:
    token = bearer(gmail.token(ALICE, LABELS))
    listed = http.get(api(gmail, "labels"), headers=token).json()["labels"]
    assert {"INBOX", "UNREAD", "SPAM", "TRASH"} <= {label["id"] for label in listed}
    created = http.post(api(gmail, "labels"), json={"name": "Hosted/alice"}, headers=token)
    assert created.status_code == 200 and created.json()["type"] == "user"
    again = http.post(api(gmail, "labels"), json={"name": "hosted/ALICE"}, headers=token)
    assert again.status_code == 409
    assert again.json()["error"]["errors"][0]["reason"] == "duplicate"
    assert http.post(api(gmail, "labels"), json={"name": "Inbox"}, headers=token).status_code == 400
    # Bob's labels are his own.
    assert http.post(api(gmail, "labels"), json={"name": "Hosted/alice"}, headers=bearer(gmail.token(BOB))).ok


def test_profile_names_the_tokens_user(gmail: GmailServer, http: requests.Session) -> None:
    answer = http.get(api(gmail, "profile"), headers=bearer(gmail.token(BOB, READONLY)))
    assert answer.json()["emailAddress"] == BOB


# --- tokens -------------------------------------------------------------------------------------------------


def test_token_checks(gmail: GmailServer, http: requests.Session) -> None:
    missing = http.get(api(gmail, "labels"))
    assert missing.status_code == 401
    error = missing.json()["error"]
    assert (error["code"], error["status"], error["errors"][0]["reason"]) == (
        401,
        "UNAUTHENTICATED",
        "required",
    )
    assert http.get(api(gmail, "labels"), headers=bearer("ya29.made-up")).status_code == 401

    insert_only = bearer(gmail.token(ALICE, INSERT))
    scoped = http.get(api(gmail, "messages"), headers=insert_only)
    assert scoped.status_code == 403
    assert scoped.json()["error"]["errors"][0]["reason"] == "insufficientPermissions"
    # Another user's mailbox is not the token's to touch.
    assert http.get(api(gmail, "profile", user=BOB), headers=bearer(gmail.token(ALICE))).status_code == 403
    # A user Gmail does not know (say, the service account itself).
    nobody = bearer(gmail.tokens.issue_token("svc@p.iam.gserviceaccount.com", [READONLY]))
    assert http.get(api(gmail, "profile"), headers=nobody).status_code == 400

    token = gmail.token(ALICE)
    gmail.tokens.expire_all()
    assert http.get(api(gmail, "labels"), headers=bearer(token)).status_code == 401


# --- faults -------------------------------------------------------------------------------------------------


def test_rate_limits_and_server_errors(gmail: GmailServer, http: requests.Session) -> None:
    headers = {**bearer(gmail.token(ALICE)), "Content-Type": "message/rfc822"}
    gmail.rate_limit("import", retry_after=3)
    gmail.user_rate_limit("import")
    gmail.server_error("import", status=503)

    def post() -> requests.Response:
        return http.post(upload_url(gmail), params={"uploadType": "media"}, data=MESSAGE, headers=headers)

    limited = post()
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "3"
    assert limited.json()["error"]["errors"][0]["reason"] == "rateLimitExceeded"
    user_limited = post()
    assert user_limited.status_code == 403
    assert user_limited.json()["error"]["errors"][0]["reason"] == "userRateLimitExceeded"
    assert post().status_code == 503
    assert gmail.imports == []
    assert post().status_code == 200
    assert len(gmail.imports) == 1


def test_lost_response_after_import(gmail: GmailServer, http: requests.Session) -> None:
    gmail.lose_response("import")
    headers = {**bearer(gmail.token(ALICE)), "Content-Type": "message/rfc822"}
    with pytest.raises(requests.ConnectionError):
        http.post(upload_url(gmail), params={"uploadType": "media"}, data=MESSAGE, headers=headers)
    assert len(gmail.messages(ALICE)) == 1  # stored although the client never heard of it


def test_dropped_request_does_nothing(gmail: GmailServer, http: requests.Session) -> None:
    gmail.drop_request("import")
    headers = {**bearer(gmail.token(ALICE)), "Content-Type": "message/rfc822"}
    with pytest.raises(requests.ConnectionError):
        http.post(upload_url(gmail), params={"uploadType": "media"}, data=MESSAGE, headers=headers)
    assert gmail.messages(ALICE) == []


def test_quota_in_gmail_units(http: requests.Session) -> None:
    now = [100.0]
    with GmailServer(quota=50, clock=lambda: now[0]) as gmail:  # two imports (25 units each) a second
        gmail.add_user(ALICE)
        http.verify = str(gmail.ca_file)
        headers = {**bearer(gmail.token(ALICE)), "Content-Type": "message/rfc822"}

        def post(number: int) -> requests.Response:
            return http.post(
                upload_url(gmail), params={"uploadType": "media"}, data=message(number), headers=headers
            )

        assert [post(n).status_code for n in range(3)] == [200, 200, 429]
        now[0] += 1.0
        assert post(4).status_code == 200
        assert len(gmail.imports) == 3


# --- the token server's Google grants -----------------------------------------------------------------------


def test_jwt_bearer_grant_for_a_delegated_service_account(gmail: GmailServer, http: requests.Session) -> None:
    tokens = gmail.tokens
    account = tokens.add_service_account(scopes=[INSERT, LABELS, READONLY], users=[ALICE])
    key = account.key
    assert key["type"] == "service_account" and key["token_uri"] == tokens.google_token_url

    def assertion(sub: str, scope: str, **claims: object) -> str:
        now = int(time.time())
        payload: dict[str, object] = {"iss": key["client_email"], "sub": sub, "aud": key["token_uri"]}
        payload["scope"] = scope
        payload.update({"iat": now, "exp": now + 3600, **claims})
        return jwt.encode(
            payload, key["private_key"], algorithm="RS256", headers={"kid": key["private_key_id"]}
        )

    def grant(signed: str) -> requests.Response:
        return http.post(key["token_uri"], data={"grant_type": JWT_BEARER, "assertion": signed})

    answer = grant(assertion(ALICE, f"{INSERT} {LABELS}"))
    assert answer.status_code == 200, answer.text
    token = answer.json()["access_token"]
    assert http.get(api(gmail, "labels"), headers=bearer(token)).status_code == 200

    not_delegated = grant(assertion(ALICE, f"{INSERT} https://mail.google.com/"))
    assert (not_delegated.status_code, not_delegated.json()["error"]) == (401, "unauthorized_client")
    unknown_user = grant(assertion(BOB, INSERT))
    assert (unknown_user.status_code, unknown_user.json()["error"]) == (400, "invalid_grant")
    too_long = grant(assertion(ALICE, INSERT, exp=int(time.time()) + 7200))
    assert too_long.json()["error"] == "invalid_grant"
    other = tokens.add_service_account("other", scopes=[INSERT])
    now = int(time.time())
    claims = {"iss": key["client_email"], "sub": ALICE, "aud": key["token_uri"], "scope": INSERT}
    forged = jwt.encode({**claims, "iat": now, "exp": now + 60}, other.key["private_key"], algorithm="RS256")
    assert grant(forged).json() == {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}


def test_google_auth_service_account_credentials(gmail: GmailServer, tmp_path: Path) -> None:
    """google-auth, which the destination uses, gets a token from this server and Gmail accepts it."""
    import google.auth.transport.requests
    from google.oauth2 import service_account

    account = gmail.tokens.add_service_account(scopes=[INSERT, READONLY])
    path = account.write_key(tmp_path / "key.json")
    credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
        str(path), scopes=[INSERT, READONLY], subject=ALICE
    )
    with requests.Session() as session:
        session.trust_env = False
        session.verify = str(gmail.ca_file)
        credentials.refresh(google.auth.transport.requests.Request(session))
        answer = session.get(api(gmail, "profile"), headers=bearer(str(credentials.token)))
    assert answer.json()["emailAddress"] == ALICE


def test_google_auth_user_credentials_refresh_and_rotate(gmail: GmailServer) -> None:
    """google-auth's user credentials (what a stored consent becomes) refresh here, and pick up a rotated
    refresh token."""
    import google.auth.transport.requests
    from google.oauth2.credentials import Credentials

    tokens = gmail.tokens
    client = tokens.add_desktop_client()
    refresh_token = tokens.issue_refresh_token(client.client_id, user=ALICE, scope=f"{INSERT} {READONLY}")
    tokens.rotate_refresh_tokens = True
    credentials = Credentials(  # type: ignore[no-untyped-call]
        None,
        refresh_token=refresh_token,
        token_uri=tokens.google_token_url,
        client_id=client.client_id,
        client_secret=client.secret,
    )
    with requests.Session() as session:
        session.trust_env = False
        session.verify = str(gmail.ca_file)
        credentials.refresh(google.auth.transport.requests.Request(session))  # type: ignore[no-untyped-call]
        answer = session.get(api(gmail, "profile"), headers=bearer(str(credentials.token)))
    assert answer.json()["emailAddress"] == ALICE
    assert credentials.refresh_token != refresh_token
    assert tokens.refresh_tokens_of(ALICE) == [credentials.refresh_token]


def consent(
    http: requests.Session, gmail: GmailServer, client_id: str, **extra: str
) -> tuple[dict[str, str], str]:
    """The scripted browser step: open the consent URL, read where Google sends the browser back."""
    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": "http://127.0.0.1:8765/",
        "scope": f"{INSERT} {LABELS} {READONLY}",
        "state": "st4te",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "access_type": "offline",
        **extra,
    }
    answer = http.get(gmail.tokens.auth_url, params=params, allow_redirects=False)
    assert answer.status_code == 302, answer.text
    location = urllib.parse.urlsplit(answer.headers["Location"])
    assert location.netloc == "127.0.0.1:8765"
    return dict(urllib.parse.parse_qsl(location.query)), verifier


def test_pkce_flow_end_to_end(gmail: GmailServer, http: requests.Session, tmp_path: Path) -> None:
    tokens = gmail.tokens
    client = tokens.add_desktop_client()
    secrets_file = json.loads(
        tokens.write_client_secrets(client, tmp_path / "client_secret.json").read_text()
    )
    installed = secrets_file["installed"]
    assert installed["redirect_uris"] == ["http://localhost"] and installed["client_secret"] == client.secret

    tokens.sign_in(BOB)
    query, verifier = consent(http, gmail, client.client_id, login_hint=ALICE)
    assert query["state"] == "st4te"
    exchange = {
        "grant_type": "authorization_code",
        "code": query["code"],
        "client_id": client.client_id,
        "client_secret": client.secret,
        "redirect_uri": "http://127.0.0.1:8765/",
    }
    wrong = http.post(installed["token_uri"], data={**exchange, "code_verifier": "not-it" * 8})
    assert wrong.json()["error"] == "invalid_grant"
    # A code is good for one exchange only, even a failed one: consent again.
    query, verifier = consent(http, gmail, client.client_id, login_hint=ALICE)
    answer = http.post(
        installed["token_uri"], data={**exchange, "code": query["code"], "code_verifier": verifier}
    )
    assert answer.status_code == 200, answer.text
    granted = answer.json()
    assert granted["refresh_token"].startswith("1//")
    profile = http.get(api(gmail, "profile"), headers=bearer(granted["access_token"])).json()
    assert profile["emailAddress"] == ALICE  # the login_hint's account consented

    refresh = {
        "grant_type": "refresh_token",
        "refresh_token": granted["refresh_token"],
        "client_id": client.client_id,
        "client_secret": client.secret,
    }
    refreshed = http.post(installed["token_uri"], data=refresh).json()
    assert (
        "refresh_token" not in refreshed
        and http.get(api(gmail, "profile"), headers=bearer(refreshed["access_token"])).ok
    )

    tokens.rotate_refresh_tokens = True
    rotated = http.post(installed["token_uri"], data=refresh).json()
    assert rotated["refresh_token"] != granted["refresh_token"]
    old = http.post(installed["token_uri"], data=refresh)
    assert (old.status_code, old.json()["error"]) == (400, "invalid_grant")

    tokens.revoke_consent(ALICE)
    revoked = http.post(installed["token_uri"], data={**refresh, "refresh_token": rotated["refresh_token"]})
    assert revoked.json() == {
        "error": "invalid_grant",
        "error_description": "Token has been expired or revoked.",
    }


def test_consent_refused_or_narrowed(gmail: GmailServer, http: requests.Session) -> None:
    tokens = gmail.tokens
    client = tokens.add_desktop_client()
    tokens.sign_in(ALICE, deny=True)
    query, _ = consent(http, gmail, client.client_id)
    assert query == {"error": "access_denied", "state": "st4te"}
    tokens.sign_in(ALICE, grant=[INSERT])  # the person left only one box ticked
    query, _ = consent(http, gmail, client.client_id)
    assert query["scope"] == INSERT
    not_loopback = http.get(
        tokens.auth_url,
        params={
            "client_id": client.client_id,
            "redirect_uri": "https://evil.example/",
            "response_type": "code",
        },
        allow_redirects=False,
    )
    assert not_loopback.status_code == 400
