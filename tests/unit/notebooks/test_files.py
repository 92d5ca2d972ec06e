"""The file tools' pure parts: decoding what a client sends, and cutting a page of text."""

from __future__ import annotations

import pytest

from kernelpool.errors import InvalidArgument
from kernelpool.notebooks.files import _text_page, decode_content


def test_file_content_decoding_and_text_pages() -> None:
    assert decode_content("aé", "utf-8") == "aé".encode()
    assert decode_content("AAE=", "base64") == b"\0\1"
    for bad, encoding in (("a\ud800", "utf-8"), ("AAE", "base64"), ("A A=", "base64")):
        with pytest.raises(InvalidArgument):
            decode_content(bad, encoding)  # type: ignore[arg-type]
    # a character cut at the page's end waits for the next page; NULs and bad bytes are binary
    assert _text_page("é😀".encode()[:4], at_end=False, max_chars=10) == ("é", 2)
    assert _text_page("é😀".encode(), at_end=True, max_chars=1) == ("é", 2)
    assert _text_page(b"a\0b", at_end=True, max_chars=10) is None
    assert _text_page(b"\xff", at_end=True, max_chars=10) is None
    assert _text_page("😀".encode()[1:], at_end=True, max_chars=10) is None
