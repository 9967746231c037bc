import io

from cxrflow.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_nothing_elsewhere():
    piped = io.StringIO()
    with Progress(4, "kt 1/3", stream=piped) as bar:
        for step in range(1, 5):
            bar.update(step, loss=0.5)
    assert piped.getvalue() == "" and not bar.shown
    terminal = Terminal()
    bar = Progress(4, "kt 1/3", unit="batch", stream=terminal)
    assert bar.shown and "kt 1/3" in terminal.getvalue()
    bar.update(4, loss=0.123456)
    bar.close()
    assert terminal.getvalue().endswith("\r")  # the bar is removed, the epoch's own line follows
    off = Terminal()
    assert not Progress(4, "x", enabled=False, stream=off).shown and off.getvalue() == ""
