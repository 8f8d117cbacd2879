"""One kind of error for expected failures, shown to the user as one line."""
from __future__ import annotations


class DeployError(Exception):
    """An expected failure: what failed, on which host, what to do.

    `detail` holds extra lines worth showing (a build log tail, nginx's
    message, the app's traceback). Never put a secret in any of these.
    """

    def __init__(self, what: str, host: str | None = None, hint: str | None = None,
                 detail: str | None = None):
        super().__init__(what)
        self.what = what
        self.host = host
        self.hint = hint
        self.detail = detail
        self.phase: str | None = None  # the phase it failed in, where a host's agent said so

    def on(self, host: str) -> "DeployError":
        """Name the host, unless one is named already."""
        if self.host is None:
            self.host = host
        return self

    def line(self) -> str:
        where = f"{self.host}: " if self.host else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{where}{self.what}{hint}"

    def __str__(self) -> str:
        text = self.line()
        if self.detail:
            text += "\n" + indent(self.detail)
        return text


def indent(text: str, prefix: str = "  | ") -> str:
    return "\n".join(prefix + line for line in text.rstrip().splitlines())


def tail(text: str, lines: int = 15) -> str:
    """The last lines of some output, where errors usually are."""
    return "\n".join(text.rstrip().splitlines()[-lines:])
