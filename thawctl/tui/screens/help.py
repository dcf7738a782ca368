"""The key reference (`?`)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS = (
    ("p", "pin the selected snapshot (verifies every tensor)"),
    ("w", "warm it instead (page cache only)"),
    ("u", "unpin it (back to cold, memory released; asks first while in use)"),
    (
        "v",
        "have thawd verify its checksums where its bytes are: its pool when pinned, else "
        "the file (nothing is read here)",
    ),
    ("d", "remove it from thawd, after asking (the file stays)"),
    ("/", "filter by name, path, tier, checksum state or label"),
    ("s", "cycle the sort: name, tier, size, restores, last restore"),
    ("S", "sessions: open restores and freezes (pid, uid, snapshot, size), latest rates"),
    ("P", "the serve pool (thawctl top --serve SOCKET): slots, models, queue, swaps/min"),
    ("↑ ↓ j k", "select a snapshot"),
    ("Home End", "the first, the last snapshot"),
    ("?", "this help"),
    ("q", "quit"),
)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape,q,question_mark,enter", "dismiss", "close", show=False),
    ]

    def compose(self) -> ComposeResult:
        lines = "\n".join(f"[b]{key:>8}[/b]  {text}" for key, text in KEYS)
        with Vertical(id="help-box"):
            yield Static("thawctl top: keys", id="help-title")
            yield Static(lines, id="help-keys")
            yield Static("any of esc, q, ? or enter closes this", id="help-hint")

    def action_dismiss(self, result: None = None) -> None:  # type: ignore[override]
        self.dismiss(None)
