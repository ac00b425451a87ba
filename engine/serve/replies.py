"""One server reply, built token by token: where it ends, and (streamed) what
of it is safe to send before it has ended."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Reply:
    """A reply ends before its first end-of-turn token, where its first stop
    sequence starts (the text keeps what precedes the stop, the token list the
    tokens before the one it starts in), or at ``max_tokens``.

    A streamed reply looks for stop sequences after every token and sends only
    whole tokens whose text no stop sequence can still take back and that do
    not end in half a character, so the pieces it sends add up to what the
    same reply unstreamed would say. An unstreamed one decodes once at the
    end and walks its prefixes only when a stop sequence is there.
    """

    def __init__(
        self,
        stops: tuple[str, ...],
        max_tokens: int,
        streamed: bool,
        decode: Callable[[list[int]], str],
        eos_ids: set[int],
    ) -> None:
        self.stops, self.max_tokens, self.streamed = stops, max_tokens, streamed
        self.decode, self.eos_ids = decode, eos_ids
        self.tokens: list[int] = []
        self.entries: list[dict[str, Any]] = []
        self.text = ""  # the text of ``tokens``: after each token if streamed, else at close
        self.ends: list[int] = []  # where the text of tokens[: i + 1] ends
        # max_tokens = 0 (echo scoring): done before any token, whatever its batch-mates ask
        self.finish: str | None = "length" if max_tokens <= 0 else None
        self.sent_tokens, self.sent_text = 0, ""
        # no stop sequence starts before here: each new token's text is searched
        # from where a stop could still begin, not from the start (no O(n²) rescans)
        self.searched = 0
        self.longest = max((len(s) for s in stops), default=0)

    def add(self, token: int, entry: Callable[[], dict[str, Any]]) -> None:
        """The next generated token; ``entry`` makes its logprobs entry."""
        if self.finish is not None:
            return
        if token in self.eos_ids:
            self.finish = "stop"
            return
        self.tokens.append(token)
        self.entries.append(entry())
        if self.streamed:
            self.text = self.decode(self.tokens)
            self.ends.append(len(self.text))
            self._cut_at_stop(self.text)
        if self.finish is None and len(self.tokens) >= self.max_tokens:
            self.finish = "length"

    def close(self) -> None:
        """The batch has stopped generating: settle the reply."""
        if not self.streamed:
            self.text = self.decode(self.tokens)
            if any(s in self.text for s in self.stops):
                for k in range(len(self.tokens)):
                    text = self.decode(self.tokens[: k + 1])
                    self.ends.append(len(text))
                    if self._cut_at_stop(text):
                        break
        self.finish = self.finish or "length"

    def _cut_at_stop(self, text: str) -> bool:
        """End the reply if ``text``, that of the tokens so far, holds a stop sequence."""
        since = max(0, self.searched - self.longest + 1)
        found = [i for i in (text.find(s, since) for s in self.stops) if i >= 0]
        if not found:
            self.searched = len(text)
            return False
        start = min(found)
        keep = next(i for i, end in enumerate(self.ends) if end > start)
        self.text, self.tokens, self.entries = text[:start], self.tokens[:keep], self.entries[:keep]
        self.finish = "stop"
        return True

    def take(self) -> tuple[str, list[dict[str, Any]]]:
        """The text and entries not sent yet that are safe to send now."""
        upto, piece = len(self.tokens), self.text
        while self.finish is None and upto > self.sent_tokens and self._unsafe(piece):
            upto -= 1
            piece = self.decode(self.tokens[:upto])
        text, entries = piece[len(self.sent_text) :], self.entries[self.sent_tokens : upto]
        self.sent_tokens, self.sent_text = upto, piece
        return text, entries

    def _unsafe(self, piece: str) -> bool:
        """Ends in half a character, or in the start of a stop sequence (only the
        last ``longest`` characters can hold one)."""
        tail = piece[-self.longest :] if self.longest else ""
        return piece.endswith("\ufffd") or any(
            tail.endswith(s[:n]) for s in self.stops for n in range(1, len(s))
        )

    def result(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "entries": self.entries,
            "completion_tokens": len(self.tokens),
            "finish_reason": self.finish,
        }
