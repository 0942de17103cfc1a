"""The byte-level tokenizer."""

from __future__ import annotations

import pytest

from raysys.models.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, ByteTokenizer


@pytest.mark.parametrize("text", ["", "hello", "naïve café ✓ 数学", "line\nbreak\x00"])
def test_round_trip(text):
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert ids[1:-1] == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text


def test_specials_and_bad_ids():
    tokenizer = ByteTokenizer()
    assert VOCAB_SIZE == tokenizer.vocab_size == 259
    assert tokenizer.encode("a", add_bos=False) == [97]
    assert (
        tokenizer.decode([BOS_ID, 104, 105, PAD_ID], skip_special=False)
        == "<bos>hi<pad>"
    )
    # A character cut in half decodes to the replacement character, not an error.
    assert tokenizer.decode(list("é".encode())[:1]) == "\ufffd"
    with pytest.raises(ValueError, match="token id 300 is outside"):
        tokenizer.decode([300])
