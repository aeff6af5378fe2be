"""Delivering one fetched message into the account's destination.

    (identity in doubt: look for it in the destination first) -> record ``pending`` (committed, an attempt
    counted) -> deliver -> record ``delivered`` (deferred, committed before any DELE)

A message whose earlier attempt did not finish (``Delivery.recover``) may already be in the destination:
it is looked up (the X-Pop-Connector-Id stamp, else Message-ID, size and SHA-256; policies/recovery.py)
and recorded if found, never delivered twice. Failures are recorded by ``Destinations``; the retention is
applied by ``Recorder.delivered``.
"""

from __future__ import annotations

from connector.message import FetchedMessage
from connector.poll.destination import Destinations
from connector.poll.plan import Delivery
from connector.poll.recorder import Recorder
from connector.pop3 import MessageInfo


class SingleDelivery:
    def __init__(self, recorder: Recorder, destinations: Destinations, *, doubtful: frozenset[str]) -> None:
        self._recorder = recorder
        self._destinations = destinations
        # UIDLs with identical copies on the server (popa3d twins): a copy found in the destination may
        # be a sibling's delivery (connector/poll/identity.py).
        self._doubtful = doubtful
        self._max_attempts = recorder.account.retry.max_attempts

    def deliver(self, fetched: FetchedMessage, delivery: Delivery) -> None:
        if delivery.recover and self._settled_by_lookup(fetched, delivery):
            return
        self._recorder.pending(fetched, delivery.info, headers_only=delivery.headers_only)
        self.deliver_recorded(fetched, delivery.info)

    def deliver_recorded(self, fetched: FetchedMessage, info: MessageInfo) -> None:
        """Deliver a message already recorded ``pending``."""
        ref = self._destinations.deliver(fetched)
        if ref is not None:
            self._recorder.delivered(fetched, info, ref)

    def _settled_by_lookup(self, fetched: FetchedMessage, delivery: Delivery) -> bool:
        """Look for an earlier attempt's delivery; True when that settles the message (found and recorded,
        or quarantined), False when it is to be delivered."""
        info, recorder = delivery.info, self._recorder
        ref = self._destinations.look_up(fetched)
        if ref is not None and info.uidl in self._doubtful:
            # What was found may be an identical copy's delivery: recording this copy delivered could lose
            # it, delivering it again could make a duplicate. It stays on the server for a person to judge.
            recorder.quarantine(
                info.uidl,
                f"an identical copy listed under the same UIDL is in the destination ({ref}), so it cannot "
                "be told whether this copy was delivered before the interruption; left on the server",
            )
            return True
        if ref is not None:
            recorder.recovered(fetched, info, ref, headers_only=delivery.headers_only)
            return True
        if delivery.attempts >= self._max_attempts:
            reason = f"gave up after {delivery.attempts} attempts; the last one did not finish"
            recorder.quarantine(info.uidl, reason)
            return True
        return False
