"""Messages per day as inline SVG, drawn by the status page itself (connector/ops/status_page.py).

Server-side SVG needs no script and no external resource: the page's Content-Security-Policy
(``default-src 'none'``) stays as strict as it was, and the chart shows without JavaScript. Every text in
it is a date or a number, escaped all the same.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta

DAYS = 30


@dataclass(frozen=True)
class Day:
    day: date
    messages: int


def day_series(per_day: Mapping[str, int], today: date, days: int = DAYS) -> list[Day]:
    """The ``days`` days up to ``today``, oldest first, with zeros for the days the journal has no row for
    (``per_day`` as ``Journal.per_day``: ``YYYY-MM-DD`` to a count)."""
    first = today - timedelta(days=days - 1)
    series = [first + timedelta(days=n) for n in range(days)]
    return [Day(day, per_day.get(day.isoformat(), 0)) for day in series]


def _label(series: Sequence[Day]) -> str:
    total = sum(day.messages for day in series)
    peak = max((day.messages for day in series), default=0)
    return f"messages delivered per day, last {len(series)} days: {total} in all, at most {peak} a day"


def _bar_height(messages: int, peak: int, height: float) -> float:
    if messages <= 0 or peak <= 0:
        return 0.0
    return max(1.0, round(height * messages / peak, 1))  # a day with one message stays visible


def _tip(day: Day) -> str:
    return html.escape(f"{day.day.isoformat()}: {day.messages} message{'s' if day.messages != 1 else ''}")


def _bars(
    series: Sequence[Day], *, left: float, top: float, bar: float, gap: float, height: float, hover: bool
) -> str:
    """One bar per day with its date and count as a tooltip. With ``hover``, an invisible full-height
    rectangle carries the tooltip of every day, the empty ones too (the large chart); without, only days
    with messages have one (the table's small charts, fifty of them on a page, stay light)."""
    peak = max((day.messages for day in series), default=0)
    parts = []
    for n, day in enumerate(series):
        h = _bar_height(day.messages, peak, height)
        x = left + n * (bar + gap)
        shape = (
            f'<rect x="{x:g}" y="{top + height - h:g}" width="{bar:g}" height="{h:g}" fill="#3b73b9">'
            if h
            else ""
        )
        if hover:
            parts.append(
                f'<g class="day"><title>{_tip(day)}</title>'
                f'<rect x="{x:g}" y="{top:g}" width="{bar:g}" height="{height:g}" fill="#fff" '
                f'fill-opacity="0"/>{shape + "</rect>" if shape else ""}</g>'
            )
        elif shape:
            parts.append(f"{shape}<title>{_tip(day)}</title></rect>")
    return "".join(parts)


def sparkline(series: Sequence[Day]) -> str:
    """A small bar chart for a table cell: one bar per day, a tooltip per day."""
    bar, gap, height = 3.0, 1.0, 18.0
    width = len(series) * (bar + gap) - gap
    label = html.escape(_label(series))
    return (
        f'<svg class="spark" xmlns="http://www.w3.org/2000/svg" width="{width:g}" height="{height + 1:g}" '
        f'viewBox="0 0 {width:g} {height + 1:g}" role="img" aria-label="{label}">'
        f'<rect x="0" y="{height:g}" width="{width:g}" height="1" fill="#ccc"/>'
        + _bars(series, left=0, top=0, bar=bar, gap=gap, height=height, hover=False)
        + "</svg>"
    )


def bar_chart(series: Sequence[Day]) -> str:
    """The account page's chart: the same bars, larger, with the peak, today's date and every week's."""
    bar, gap, height, left, top, bottom, right = 16.0, 4.0, 120.0, 40.0, 10.0, 22.0, 16.0
    width = left + len(series) * (bar + gap) + right  # room for the last date, centred on its bar
    peak = max((day.messages for day in series), default=0)
    e = html.escape
    labels = [
        f'<text x="{left - 6:g}" y="{top + 4:g}" text-anchor="end">{e(str(peak))}</text>',
        f'<text x="{left - 6:g}" y="{top + height:g}" text-anchor="end">0</text>',
    ]
    for n, day in enumerate(series):
        if (len(series) - 1 - n) % 7 == 0:  # today, and every week back from it
            x = left + n * (bar + gap) + bar / 2
            labels.append(
                f'<text x="{x:g}" y="{top + height + 16:g}" text-anchor="middle">'
                f"{e(day.day.strftime('%m-%d'))}</text>"
            )
    return (
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width:g}" '
        f'height="{top + height + bottom:g}" viewBox="0 0 {width:g} {top + height + bottom:g}" role="img" '
        f'aria-label="{e(_label(series))}" font-size="11" font-family="system-ui, sans-serif" fill="#555">'
        f'<rect x="{left:g}" y="{top + height:g}" width="{width - left:g}" height="1" fill="#bbb"/>'
        f'<rect x="{left:g}" y="{top:g}" width="{width - left:g}" height="1" fill="#eee"/>'
        + "".join(labels)
        + _bars(series, left=left, top=top, bar=bar, gap=gap, height=height, hover=True)
        + "</svg>"
    )
