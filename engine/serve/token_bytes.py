"""Each token's UTF-8 bytes, for the ``bytes`` field of chat logprobs.

OpenAI's clients join a reply's ``bytes`` to rebuild text that a character
split across tokens leaves unreadable token by token. Decoding one such
token gives U+FFFD, whose bytes would be wrong; a byte-level BPE tokenizer
(GPT-2's alphabet: SmolLM2, Llama 3, Qwen) maps each byte to one character
of its vocabulary, so a token's bytes are read back from its vocabulary
string. Other tokenizers, and added tokens (special or not, they are stored
as plain text), fall back to the token's decoded text.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-character map (transformers' ``bytes_to_unicode``), inverted:
    printable Latin-1 bytes stand for themselves, the other 68 for U+0100 on."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def is_byte_level(tokenizer: Any) -> bool:
    """Whether a (fast) tokenizer decodes with the byte-level decoder."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"


def token_bytes_of(tokenizer: Any) -> Callable[[int], tuple[int, ...]]:
    """``token id -> its UTF-8 bytes`` for this tokenizer (memoised per id, so
    immutable)."""
    alphabet = byte_level_alphabet() if is_byte_level(tokenizer) else None
    added = set(getattr(tokenizer, "added_tokens_decoder", {}))

    @functools.cache
    def token_bytes(token: int) -> tuple[int, ...]:
        if alphabet is not None and token not in added:
            piece = tokenizer.convert_ids_to_tokens(token)
            if isinstance(piece, str) and all(c in alphabet for c in piece):
                return tuple(alphabet[c] for c in piece)
        return tuple(tokenizer.decode([token]).encode("utf-8"))

    return token_bytes
