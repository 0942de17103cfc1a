"""Names that become storage paths cannot escape their namespace."""

from __future__ import annotations

import pytest

from raysys.sharing.names import InvalidName, check_name


@pytest.mark.parametrize("name", ["lab-a", "alice", "run_1.v2", "A", "x" * 64, "0day"])
def test_safe_names_pass(name):
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "../bob",
        "..",
        ".",
        "a/../b",
        "/etc",
        "a/b",
        "a\\b",
        "s3://bucket",
        "C:",
        "a b",
        "a\x00b",
        "",
        "-lead",
        ".hidden",
        "x" * 65,
        "a..b",
        "ünï",
    ],
)
def test_escaping_names_are_refused(name):
    with pytest.raises(InvalidName) as err:
        check_name(name, "tenant")
    assert repr(name) in str(err.value)
    assert "tenant name" in str(err.value)


def test_non_string_is_refused():
    with pytest.raises(InvalidName, match="must be a string"):
        check_name(3)
