"""Accounts kept in a spreadsheet: CSV files read beside ``[[accounts]]``.

``accounts_file = "accounts.csv"`` at the top of the configuration, or one ``[[account_files]]`` table per
file (``path``, and defaults for its rows such as ``destination``); relative paths are relative to the
configuration file. The first row names the columns: the fields of an ``[[accounts]]`` table, nested ones
dotted (``retention.mode``, ``oauth.client_id``); an empty cell is a field not set. Each row becomes the
dict an ``[[accounts]]`` table gives, so that config.py validates both alike, and every error about a row
is reported at its line (``accounts.csv:17: username: required field is missing``).

Secrets are never written in the file: a secret column holds ``env:NAME`` or ``file:PATH`` (relative: to
the accounts file), which become the configuration's ``{ env = "NAME" }`` and ``{ file = "PATH" }``.

Nothing here knows the account model: the columns come from it through ``columns_of``.
"""

from __future__ import annotations

import csv
import io
import re
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

# The separators a spreadsheet writes; the header line (field names, none of these in them) tells which.
_DELIMITERS = (",", ";", "\t")
_ROW_WHERE = re.compile(r"accounts\[(\d+)\](?:\.(.*))?")
# What stands in for a secret written inline, so that the row's other fields are still checked.
_REFUSED_SECRET = SecretStr("")


@dataclass(frozen=True)
class Columns:
    """What a header may name: every field of the account model (dotted below nested models) except lists,
    and which of them are secrets."""

    known: frozenset[str]
    secrets: frozenset[str]
    lists: frozenset[str]


def columns_of(model: type[BaseModel]) -> Columns:
    known: set[str] = set()
    secrets: set[str] = set()
    lists: set[str] = set()
    _walk(model, "", known, secrets, lists)
    return Columns(frozenset(known), frozenset(secrets), frozenset(lists))


def _walk(model: type[BaseModel], prefix: str, known: set[str], secrets: set[str], lists: set[str]) -> None:
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        column = prefix + name
        kinds = _types_in(info.annotation)
        if any(kind is list for kind in kinds):
            lists.add(column)
            continue
        known.add(column)
        if SecretStr in kinds:
            secrets.add(column)
        for kind in kinds:
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                _walk(kind, column + ".", known, secrets, lists)


def _types_in(annotation: Any) -> list[Any]:
    """The classes a field's annotation may hold (``X | None`` -> X, None; ``list[Y]`` -> list)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _types_in(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [kind for arg in typing.get_args(annotation) for kind in _types_in(arg)]
    if origin is not None:
        return [origin]
    return [annotation]


@dataclass(frozen=True)
class AccountFile:
    """One file to read: where it is, how messages name it, and its ``[[account_files]]`` table."""

    path: Path
    shown: str
    # "<config>: account_files[0]" (errors in the table's defaults are reported there); None for the
    # top-level accounts_file, which has no defaults.
    table: str | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    """One account of a file: the dict an ``[[accounts]]`` table would give, and where it was written."""

    fields: dict[str, Any]
    file: AccountFile
    line: int
    # Top-level fields that come from the file's table, not from the row.
    inherited: frozenset[str]

    @property
    def where(self) -> str:
        return f"{self.file.shown}:{self.line}"


@dataclass
class FileAccounts:
    """The rows of every account file, and what was wrong with the files themselves (headers, inline
    secrets, duplicate names); the rows' fields are validated by config.py with the ``[[accounts]]``."""

    rows: list[Row] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    files: list[AccountFile] = field(default_factory=list)

    def place(self, where: str, first: int) -> str | None:
        """Where a configuration error at ``where`` (``accounts[N].retention.days``, N counting
        ``[[accounts]]`` first, then these rows from ``first``) is to be reported: the row's line
        (``accounts.csv:17: retention.days``), or the file's table when the field came from it; None for
        an error that is not about a row."""
        match = _ROW_WHERE.fullmatch(where)
        if match is None or int(match.group(1)) < first:
            return None
        row = self.rows[int(match.group(1)) - first]
        rest = match.group(2)
        if not rest:
            return row.where
        top = re.split(r"[.\[]", rest, maxsplit=1)[0]
        if top in row.inherited and row.file.table is not None:
            return f"{row.file.table}.{rest}"
        return f"{row.where}: {rest}"


_AT_LINE = re.compile(r"(.+?):(\d+): ")


def by_line(errors: Sequence[str]) -> list[str]:
    """Errors about rows in file and line order (a file's own, such as an inline secret, among the others);
    the rest, about the configuration file, first and as they came."""

    def key(error: str) -> tuple[int, str, int]:
        match = _AT_LINE.match(error)
        return (1, match.group(1), int(match.group(2))) if match else (0, "", 0)

    return sorted(errors, key=key)


def files_from_config(data: Mapping[str, Any], config_file: Path, columns: Columns) -> FileAccounts:
    """The files ``accounts_file`` and ``[[account_files]]`` name (nothing read yet); errors in those keys."""
    found = FileAccounts()
    base = config_file.parent
    single = data.get("accounts_file")
    if single is not None:
        if isinstance(single, str) and single:
            found.files.append(AccountFile(base / single, str(base / single)))
        else:
            found.errors.append(f"{config_file}: accounts_file: expected a file name (a string)")
    tables = data.get("account_files", [])
    if not isinstance(tables, list):
        found.errors.append(f"{config_file}: account_files: expected [[account_files]] tables")
        tables = []
    for index, table in enumerate(tables):
        where = f"{config_file}: account_files[{index}]"
        if not isinstance(table, Mapping):
            found.errors.append(f"{where}: expected a table")
            continue
        path = table.get("path")
        if not isinstance(path, str) or not path:
            found.errors.append(f"{where}.path: required: the accounts file (CSV), relative to this file")
            continue
        defaults = {key: value for key, value in table.items() if key != "path"}
        bad = [key for key in defaults if key == "name" or key not in columns.known]
        for key in bad:
            reason = "each row names its account" if key == "name" else "not an account field"
            found.errors.append(f"{where}.{key}: {reason} (check the spelling)")
        if not bad:
            found.files.append(AccountFile(base / path, str(base / path), where, defaults))
    seen: dict[Path, str] = {}
    for account_file in found.files:
        key = account_file.path.resolve()
        if key in seen:
            found.errors.append(f"{config_file}: {account_file.shown}: listed twice")
        seen[key] = account_file.shown
    return found


def read_files(found: FileAccounts, columns: Columns, taken: Mapping[str, str]) -> FileAccounts:
    """Read the rows of ``found.files``. ``taken``: account names already used (name -> where), which a
    row may not use again."""
    names = dict(taken)
    seen_paths: set[Path] = set()
    for account_file in found.files:
        if account_file.path.resolve() in seen_paths:
            continue
        seen_paths.add(account_file.path.resolve())
        for row_or_error in _read(account_file, columns):
            if isinstance(row_or_error, str):
                found.errors.append(row_or_error)
                continue
            name = row_or_error.fields.get("name")
            if isinstance(name, str) and name in names:
                found.errors.append(
                    f"{row_or_error.where}: name: duplicate name {name!r} (also {names[name]})"
                )
                continue
            if isinstance(name, str):
                names[name] = row_or_error.where
            found.rows.append(row_or_error)
    return found


def _read(account_file: AccountFile, columns: Columns) -> Iterator[Row | str]:
    shown = account_file.shown
    try:
        raw = account_file.path.read_bytes()
    except OSError as exc:
        yield f"{shown}: cannot read the accounts file: {exc.strerror or exc}"
        return
    try:
        # utf-8-sig: spreadsheets often start their UTF-8 export with a byte order mark.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        yield f"{shown}: not UTF-8 text (byte {exc.start}); export the sheet as CSV UTF-8"
        return
    first_line = text.split("\n", 1)[0]
    delimiter = max(_DELIMITERS, key=first_line.count)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return  # an empty file: no accounts
        header = [name.strip() for name in header]
        problems = _header_problems(header, columns)
        for problem in problems:
            yield f"{shown}:1: {problem}"
        if problems:
            return
        line = reader.line_num + 1
        for cells in reader:
            start, line = line, reader.line_num + 1
            if not any(cell.strip() for cell in cells):
                continue  # blank lines and rows of empty cells
            if any(cell.strip() for cell in cells[len(header) :]):
                yield f"{shown}:{start}: {len(cells)} cells, but the header names {len(header)} columns"
                continue
            yield from _row(account_file, columns, header, cells, start)
    except csv.Error as exc:
        yield f"{shown}:{reader.line_num}: not valid CSV: {exc}"


def _header_problems(header: Sequence[str], columns: Columns) -> list[str]:
    problems = []
    for index, name in enumerate(header):
        if not name:
            problems.append(f"column {index + 1} has no name")
        elif name in columns.lists:
            problems.append(f"{name}: a list, which a cell cannot hold: write this account as [[accounts]]")
        elif name not in columns.known:
            problems.append(f"{name}: unknown column (the columns are the fields of [[accounts]])")
        elif header.index(name) != index:
            problems.append(f"{name}: named twice")
        else:
            outer = next((other for other in header if name.startswith(other + ".")), None)
            if outer is not None:
                problems.append(f"{name}: cannot go with column {outer} (write one or the other)")
    return problems


def _row(
    account_file: AccountFile, columns: Columns, header: Sequence[str], cells: Sequence[str], line: int
) -> Iterator[Row | str]:
    fields: dict[str, Any] = {}
    for column, raw in zip(header, cells, strict=False):
        value: Any = raw.strip()
        if not value:
            continue  # an empty cell: not set
        if column in columns.secrets:
            value = _secret_reference(value, account_file.path.parent)
            if value is None:
                yield (
                    f"{account_file.shown}:{line}: {column}: a secret written in the file; write env:NAME "
                    "(an environment variable) or file:PATH (a file holding it) instead"
                )
                value = _REFUSED_SECRET
        _put(fields, column.split("."), value)
    merged = _merge(account_file.defaults, fields)
    inherited = frozenset(key for key in account_file.defaults if key not in fields)
    yield Row(merged, account_file, line, inherited)


def _secret_reference(value: str, base: Path) -> dict[str, str] | None:
    kind, sep, rest = value.partition(":")
    if not sep or not rest.strip():
        return None
    if kind == "env":
        return {"env": rest.strip()}
    if kind == "file":
        return {"file": str(base / rest.strip())}
    return None


def _put(fields: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        fields = fields.setdefault(part, {})
    fields[path[-1]] = value


def _merge(defaults: Mapping[str, Any], row: Mapping[str, Any]) -> dict[str, Any]:
    """The table's defaults under the row's cells; nested tables merge key by key."""
    merged = dict(defaults)
    for key, value in row.items():
        below = merged.get(key)
        if isinstance(below, Mapping) and isinstance(value, Mapping):
            merged[key] = _merge(below, value)
        else:
            merged[key] = value
    return merged
