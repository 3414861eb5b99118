"""cyclej.errors.first_line: the one home of "a library's multi-line error into a one-line message"."""

from __future__ import annotations

from cyclej.errors import first_line


def test_first_line_is_the_first_non_empty_line_cut_to_the_limit() -> None:
    assert (
        first_line(ValueError("\n\n  bad header  \nTraceback (most recent call last):\n  ..."))
        == "bad header"
    )
    assert first_line("x" * 500) == "x" * 200
    assert first_line("abcdef", limit=3) == "abc"


def test_first_line_of_an_empty_message_is_empty_not_an_index_error() -> None:
    # `str(exc).splitlines()[0]`, which ten call sites used before, raises IndexError on these.
    assert first_line(KeyError()) == ""
    assert first_line(RuntimeError("   \n ")) == ""
