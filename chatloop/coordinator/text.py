"""Token ids to streamed text: valid UTF-8 at every chunk, stop strings caught even when they span tokens."""

from __future__ import annotations

import codecs


class TextStream:
    """Feed generated token bytes; get text that is safe to send now.

    Bytes of a character split across tokens are held until the character is complete. Text that could be
    the start of a stop string is held until it is known not to be one, so a stop string never leaks.
    """

    def __init__(self, stop: list[str] | tuple[str, ...] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._stop = [s for s in stop if s]
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, data: bytes) -> str:
        """Returns the text to emit now; sets ``stopped`` when a stop string appeared (text before it is returned)."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(data)
        if not self._stop:
            self._held = ""
            return text
        first = None
        for s in self._stop:
            i = text.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            self.stopped = True
            self.matched = first[1]
            self._held = ""
            return text[: first[0]]
        keep = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """The rest, at the end of generation (an incomplete character becomes U+FFFD)."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text
