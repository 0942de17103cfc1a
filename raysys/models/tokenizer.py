"""Byte-level tokenizer for the project's own tiny models.

Every UTF-8 byte is its own token (ids 0-255), followed by three special tokens:
BOS (256), EOS (257) and PAD (258). Any text encodes without unknown tokens, and
decoding the ids of an encoded text gives that text back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from raysys.runtime.config import is_whole_number

NUM_BYTE_TOKENS = 256
BOS_ID = 256
EOS_ID = 257
PAD_ID = 258
VOCAB_SIZE = 259


class ByteTokenizer:
    """Text <-> token ids, one token per UTF-8 byte plus BOS/EOS/PAD specials."""

    bos_id = BOS_ID
    eos_id = EOS_ID
    pad_id = PAD_ID
    vocab_size = VOCAB_SIZE

    def encode(
        self, text: str, *, add_bos: bool = True, add_eos: bool = False
    ) -> list[int]:
        """Token ids of ``text``, optionally framed by BOS and EOS."""
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, BOS_ID)
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 (a sequence cut mid-character) becomes U+FFFD.

        Raises:
            ValueError: an id is outside ``[0, vocab_size)``.
        """
        data = bytearray()
        for token in ids:
            token = int(token)
            if token < NUM_BYTE_TOKENS and token >= 0:
                data.append(token)
            elif token < VOCAB_SIZE and token >= 0:
                if not skip_special:
                    data.extend(self.special_name(token).encode())
            else:
                raise ValueError(
                    f"token id {token} is outside the byte vocabulary [0, {VOCAB_SIZE})"
                )
        return data.decode("utf-8", errors="replace")

    @staticmethod
    def special_name(token: int) -> str:
        """The printable name of a special token id (``<bos>``, ``<eos>``, ``<pad>``)."""
        return {BOS_ID: "<bos>", EOS_ID: "<eos>", PAD_ID: "<pad>"}[token]


def check_token_ids(prompt: Any, vocab_size: int) -> list[int]:
    """``prompt`` as a list of plain ints, each a token id in ``[0, vocab_size)``.

    Lists, tuples, numpy arrays and torch tensors of integers are accepted (ids
    that came through Ray may be numpy integers). A token outside the
    vocabulary would fail the embedding lookup of the whole batched step it
    runs in, so callers check prompts before they reach a model.

    Raises:
        ValueError: the prompt is text, a single number, empty, or names its
            first bad token and that token's position.
    """
    if isinstance(prompt, str | bytes):
        raise ValueError(f"the prompt is a {type(prompt).__name__}; give token ids")
    # Arrays and tensors give plain ints this way (a 0-d one gives one number).
    tokens = prompt.tolist() if hasattr(prompt, "tolist") else prompt
    try:
        tokens = list(tokens)
    except TypeError:
        raise ValueError(
            f"the prompt is {tokens!r}, not a sequence of token ids"
        ) from None
    if not tokens:
        raise ValueError("the prompt is empty; give at least one token id")
    for position, token in enumerate(tokens):
        if not is_whole_number(token):
            raise ValueError(
                f"prompt token {position} is {token!r}, not a whole number token id"
            )
        if not 0 <= token < vocab_size:
            raise ValueError(
                f"prompt token {position} is {int(token)}, outside the model's "
                f"vocabulary [0, {vocab_size})"
            )
    return [int(t) for t in tokens]
