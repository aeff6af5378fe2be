"""Before a DELE that rests on a ledger row: is the listed message still the one the row is about? The I/O
half of ``policies.listing.same_message`` (LIST sizes when the listing had none, ``TOP n 0`` for the
header hash).

Cost: nothing for a poll that deletes nothing (an idle poll keeping its mail). For each message whose DELE
a row decides (retention "days" once it is due, or a deletion an earlier session did not complete): one
``TOP n 0`` when the row has a header hash (every row written since header hashes are recorded), else its
LIST size (pipelined ``LIST n`` when the listing was UIDL alone). Messages delivered in this same session
are deleted without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from connector.errors import SourceProtocolError
from connector.ledger.records import KnownMessage
from connector.policies.listing import same_message
from connector.poll.identity import header_hash_of
from connector.poll.pipeline import SIZE_QUERIES
from connector.pop3 import MessageInfo, Pop3Client


def not_the_recorded(
    pop: Pop3Client, deletions: Sequence[MessageInfo], rows: Mapping[str, KnownMessage], *, sized: bool
) -> list[MessageInfo]:
    """The ``deletions`` (with their LIST sizes) that are not the messages their rows recorded under the
    same UIDL; ``sized``: the listing already has LIST sizes."""
    if not deletions:
        return []
    # Sizes only where a row has no header hash to compare.
    unhashed = [
        info for info in deletions if (row := rows.get(info.uidl)) is not None and not row.header_hash
    ]
    sizes = {info.number: info.size for info in (unhashed if sized else _sized(pop, unhashed))}
    infos = [info._replace(size=sizes.get(info.number, info.size)) for info in deletions]
    others: list[MessageInfo] = []
    for info in infos:
        row = rows.get(info.uidl)
        if row is None:
            continue
        digest = header_hash_of(pop, info.number) if row.header_hash else None
        if not same_message(info, row, digest):
            others.append(info)
    return others


def _sized(pop: Pop3Client, infos: Sequence[MessageInfo]) -> list[MessageInfo]:
    if not infos:
        return []
    if len(infos) <= SIZE_QUERIES:
        entries = pop.list_sizes_of([info.number for info in infos])
    else:
        entries = pop.list_sizes()
    sizes = {entry.number: entry.size for entry in entries}
    if not {info.number for info in infos} <= sizes.keys():
        raise SourceProtocolError(f"{pop.peer}: LIST answered for other messages than asked")
    return [info._replace(size=sizes[info.number]) for info in infos]
