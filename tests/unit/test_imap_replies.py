"""Pure parsing of IMAP destination replies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from connector.destinations.imap import _appended_uids


@pytest.mark.parametrize(
    ("text", "count", "expected"),
    [
        ("[APPENDUID 38505 3955] APPEND completed", 1, ("38505", ["3955"])),
        (
            "[APPENDUID 38505 3955:3957,3960] Append completed.",
            4,
            ("38505", ["3955", "3956", "3957", "3960"]),
        ),
        ("[appenduid 7 9:8] ok", 2, ("7", ["8", "9"])),
        ("[APPENDUID 38505 3955:3957] too few for the batch", 4, None),
        ("[APPENDUID 38505 1:4294967295] a server's slip", 3, None),
        ("[APPENDUID 38505 3955,,3956] malformed", 2, None),
        ("APPEND completed (no UIDPLUS)", 2, None),
    ],
)
def test_appended_uids(text: str, count: int, expected: tuple[str, list[str]] | None) -> None:
    assert _appended_uids(text, count) == expected


@given(st.text(max_size=80), st.integers(min_value=1, max_value=64))
def test_appended_uids_never_raises(text: str, count: int) -> None:
    result = _appended_uids(f"[APPENDUID 1 {text}]", count)
    assert result is None or len(result[1]) == count
