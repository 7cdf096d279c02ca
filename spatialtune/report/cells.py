"""What the report's blocks hold besides plain strings, shared by its writers: a table cell or a
heading with a hover title (a device's id behind its name) and a mark (a row to notice)."""

from __future__ import annotations

from typing import NamedTuple


class Cell(NamedTuple):
    """Text with a hover title (HTML ``title``; Markdown shows only the text) and a CSS class."""

    text: str
    title: str = ""
    mark: str = ""

    def __str__(self) -> str:
        return self.text


def us(x: float | None) -> str:
    return "–" if x is None else f"{x * 1e6:.1f} µs"


def times(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}x"


def device_cell(names: dict[str, str], device_id: str) -> Cell:
    """A device by its name, kind and units, its id behind it."""
    return Cell(names.get(device_id, device_id), device_id)
