"""containerd's filter syntax for List: parsing, matching and errors (pure functions, no server)."""

from __future__ import annotations

import pytest

from snapshotter.filters import FilterSyntaxError, parse_all, snapshot_fields, unquote

REF = "containerd.io/snapshot.ref"


def snap(name="default/3/sha256:top", parent="default/2/sha256:base", kind="committed", labels=None):
    return snapshot_fields(name, parent, kind, labels if labels is not None else {REF: "sha256:top", "a.b": "x"})


def matches(*filters: str, **fields) -> bool:
    return parse_all(filters).match(snap(**fields))


def test_no_filters_and_empty_filter_match_everything():
    assert matches()
    assert matches("")
    assert matches("kind==view", "")


def test_handshake_filter_that_containerd_sends():
    handshake = f'labels."{REF}"==sha256:top,parent==default/2/sha256:base'
    assert matches(handshake)
    assert not matches(f'labels."{REF}"==sha256:top,parent==default/9/other')
    assert not matches(handshake, labels={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("kind==committed", True),
        ("kind==active", False),
        ("kind!=active", True),
        ("name==default/3/sha256:top", True),
        ('name=="default/3/sha256:top"', True),
        ("name~=top$", True),
        ("name~=^top", False),  # unanchored search, but ^ still anchors
        ("name~=/sha256:t[aeiou]p/", True),
        ("name~=|^default/3/|", True),
        ("parent~=base", True),
        ("labels.a.b==x", True),  # dotted field paths join into the label key
        ('labels."a.b"==x', True),
        ("labels.a.b", True),  # presence
        ("labels.missing", False),
        ("labels.missing!=x", True),  # absent reads as "", which is != x
        ("labels.missing==", None),  # no value: syntax error
        ("unknownfield==x", False),
        ("unknownfield!=x", True),
        ("kind==committed,labels.a.b==x", True),
        ("kind==committed,labels.a.b==y", False),
        (" kind == committed", True),  # spaces before tokens are allowed
    ],
)
def test_selectors(text, expected):
    if expected is None:
        with pytest.raises(FilterSyntaxError):
            parse_all([text])
    else:
        assert matches(text) is expected


def test_several_filters_are_alternatives():
    assert matches("kind==active", "kind==committed")
    assert not matches("kind==active", "kind==view")
    assert matches("kind==view,name~=x", f'labels."{REF}"')


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name==", "expected a value"),
        ("name=x", "unsupported operator '='"),
        ("name===x", "unsupported operator"),
        ("==x", "expected a field"),
        ("name==a b", "unexpected input ' '"),
        ("name==x ", "unexpected input"),
        ('"unterminated', "not terminated"),
        ("name==/x/", "only allowed for regular expressions"),
        ("labels./x/==y", "only allowed for regular expressions"),
        ("name~=/[/", "bad regular expression"),
        ("name~=/\\d/", "unknown escape"),  # containerd's quoting rejects \d (write \\d)
        ("kind==active,", "expected a field"),
        (",kind==active", "expected a field"),
        ("name==a|b", None),  # not OR: '|' inside an unquoted value is part of the value
        ("name\x00==x", "null"),
    ],
)
def test_malformed_filters_name_the_problem(text, fragment):
    if fragment is None:
        assert parse_all([text]).match(snapshot_fields("a|b", "", "active", {}))
        return
    with pytest.raises(FilterSyntaxError) as error:
        parse_all(["kind==view", text])
    assert fragment in str(error.value)
    assert repr(text) in str(error.value)


def test_unquote_follows_go_rules_with_slash_and_pipe_quotes():
    assert unquote('"a\\tb\\"c"') == 'a\tb"c'
    assert unquote("/a\\/b\\\\d/") == "a/b\\d"
    assert unquote("|x\\|y|") == "x|y"
    assert unquote('"\\x41\\u00e9\\101"') == "AéA"
    with pytest.raises(ValueError):
        unquote('"a\\/b"')  # \/ only inside /.../
    with pytest.raises(ValueError):
        unquote('"a\\qb"')
