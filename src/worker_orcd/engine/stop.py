"""Stop strings over streamed text: hold back what could still become a stop string.

Each stop string has a KMP automaton whose state is the length of its longest prefix that ends the text
so far, so a token costs O(new characters x stop strings) however long the stops are or how much is held.
"""

from __future__ import annotations


def _failure(s: str) -> list[int]:
    """KMP failure function: fail[i] = length of the longest proper prefix of s[:i+1] that is also its suffix."""
    fail = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class StopMatcher:
    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in dict.fromkeys(stops or []) if s]
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)  # per stop: its longest prefix that ends the text seen
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Feed new text; returns what is safe to emit. After a match, `stopped` is True."""
        if not self.stops:
            return text
        start = len(self.pending)
        self.pending += text
        first = min((p for p in (self._advance(k, start) for k in range(len(self.stops))) if p >= 0), default=-1)
        if first >= 0:  # the earliest match in the text wins, as when searching each stop string
            out, self.pending, self.stopped = self.pending[:first], "", True
            return out
        hold = max(self._state)  # the longest tail that may still grow into a stop string
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _advance(self, k: int, start: int) -> int:
        """Run stop k's automaton over pending[start:]; the start of its first match there, or -1."""
        s, fail, j = self.stops[k], self._fail[k], self._state[k]
        for i in range(start, len(self.pending)):
            c = self.pending[i]
            while j and s[j] != c:
                j = fail[j - 1]
            if s[j] == c:
                j += 1
            if j == len(s):
                self._state[k] = 0
                return i + 1 - len(s)
        self._state[k] = j
        return -1
