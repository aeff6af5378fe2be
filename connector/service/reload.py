"""What a configuration reload (SIGHUP) changes: a pure comparison of the old and new account lists."""

from __future__ import annotations

from dataclasses import dataclass, field

from connector.config import Account, Config, Destination


@dataclass(frozen=True)
class AccountChanges:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [
            f"{label} {', '.join(names)}"
            for label, names in (("added", self.added), ("removed", self.removed), ("changed", self.changed))
            if names
        ]
        return "; ".join(parts) or "no account changed"


def account_changes(old: Config, new: Config) -> AccountChanges:
    """Enabled accounts by name; ``changed`` when the account's settings or its destination's differ."""
    before = _enabled(old)
    after = _enabled(new)
    return AccountChanges(
        added=[name for name in after if name not in before],
        removed=[name for name in before if name not in after],
        changed=[name for name in after if name in before and before[name] != after[name]],
    )


def _enabled(config: Config) -> dict[str, tuple[Account, Destination]]:
    # Models compare field by field (secrets by value), so an edited password counts as a change.
    return {
        account.name: (account, config.destination_for(account))
        for account in config.accounts
        if account.enabled
    }


def service_changes(old: Config, new: Config) -> list[str]:
    """[service] fields that differ: they only take effect after a restart."""
    before, after = old.service.model_dump(), new.service.model_dump()
    return sorted(key for key in after if before.get(key) != after.get(key))
