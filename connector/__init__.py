"""POP Connector: moves mail from POP3 mailboxes into IMAP folders and Exchange, exactly once."""

__version__ = "0.1.0"
