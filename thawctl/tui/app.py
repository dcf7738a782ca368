"""`ThawTop`, the Textual App behind `thawctl top`."""

from __future__ import annotations

from textual.app import App
from textual.binding import Binding

from thawctl.tui.screens.main import MainScreen
from thawctl.tui.source import Source


class ThawTop(App[None]):
    """A live dashboard of one thawd. `source` supplies its data (tui/source.py)."""

    CSS_PATH = "thawtop.tcss"
    TITLE = "thawctl top"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [Binding("ctrl+c", "quit", "quit", show=False, priority=True)]

    def __init__(self, source: Source, interval_s: float = 1.0, serve_socket: str = "") -> None:
        super().__init__()
        self.source = source
        self.interval_s = interval_s
        self.serve_socket = serve_socket

    def on_mount(self) -> None:
        self.push_screen(MainScreen(self.source, self.interval_s, self.serve_socket))

    async def action_quit(self) -> None:
        # Break the watch worker's blocking read first, so the app exits at once.
        self.source.stop()
        self.exit()
