"""`BadExample`: one example that cannot be used, with a reason code and where it came from (file, line)."""

from __future__ import annotations

from paligemma_ft.errors import UserError
from paligemma_ft.safety import printable


class BadExample(UserError, ValueError):
    """An example that cannot be used, with a short machine-readable `reason` and where it came from.

    The message shows control characters of the file name and detail as escapes (`\\x1b`), since both come from
    the data and end up on the console.

    Args:
      reason: a short code counted in the bad-input report, e.g. "malformed_json", "missing_image".
      detail: a human explanation.
      file: the file the example came from (JSONL, annotations or image file), if known.
      line: the 1-based line in `file`, if the source is line based.
    """

    def __init__(self, reason: str, detail: str = "", *, file: str | None = None, line: int | None = None):
        self.reason, self.detail, self.file, self.line = reason, detail, file, line
        super().__init__(self._message())

    def _message(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else (self.file or "<unknown source>")
        return printable(f"{where}: {self.detail or self.reason} [{self.reason}]")

    def located(self, file: str | None, line: int | None) -> BadExample:
        """This error with `file`/`line` filled in where they are still unknown."""
        if self.file is not None:
            return self
        return BadExample(self.reason, self.detail, file=file, line=self.line if line is None else line)

    def __reduce__(self):  # Keeps keyword arguments through pickling (worker processes, copies).
        return (_rebuild_bad_example, (self.reason, self.detail, self.file, self.line))


def _rebuild_bad_example(reason, detail, file, line) -> BadExample:
    return BadExample(reason, detail, file=file, line=line)
