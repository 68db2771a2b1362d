"""The one error type a user sees: a bad config, flag or input, reported in one line with exit 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(Exception):
    """Bad user input. `key` is the TOML key or flag it concerns, when there is one."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown(kind: str, word: str, choices: Iterable[str], key: str = "") -> ConfigError:
    choices = sorted(choices)
    return ConfigError(
        f"unknown {kind} {word!r}{did_you_mean(word, choices)}; known: {', '.join(choices)}", key
    )
