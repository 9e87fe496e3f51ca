"""containerd's filter syntax, as List requests use it.

A request carries zero or more filter strings; a snapshot is listed when it matches ANY of
them (no strings: everything). One string is a comma-separated list of selectors that must
ALL match:

    selector  := fieldpath [operator value]      (no operator: the field must be present)
    fieldpath := field ("." field)*               field: [A-Za-z0-9_-]+ or "double quoted"
    operator  := "==" | "!=" | "~="               (~= is an unanchored regular expression)
    value     := [^\\s,]+ | "quoted" | /regexp/ | |regexp|   (/ and | quoting only after ~=)

Fields of a snapshot: `name`, `parent`, `kind` (active, view, committed) and
`labels.<key>` (for keys with dots or slashes, quote them: `labels."containerd.io/snapshot.ref"`).
In containerd, `|` is a quote character for regular expressions, not an OR operator.

This follows containerd's filters package (parser, scanner and quote rules) so that a filter
containerd accepts means the same thing here. One deliberate difference: a regular expression
that does not compile is an error (INVALID_ARGUMENT) instead of silently matching nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from snapshotter.errors import InvalidArgument

# Scanner token kinds (anything else is returned as the raw character).
_EOF, _QUOTED, _VALUE, _FIELD, _SEPARATOR, _OPERATOR, _ILLEGAL = ("EOF", "QUOTED", "VALUE", "FIELD", "SEP", "OP", "ILLEGAL")
_QUOTES = '/|"'
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}

Adaptor = Callable[[list[str]], tuple[str, bool]]


class FilterSyntaxError(InvalidArgument):
    """A filter string does not parse."""


@dataclass(frozen=True)
class Selector:
    """One `fieldpath op value` test."""

    fieldpath: tuple[str, ...]
    operator: str  # "present", "==", "!=", "~="
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(list(self.fieldpath))
        if self.operator == "present":
            return present
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        assert self.pattern is not None
        return self.pattern.search(value) is not None


@dataclass(frozen=True)
class Filter:
    """Alternatives (any) of conjunctions (all) of selectors; no alternatives matches everything."""

    alternatives: tuple[tuple[Selector, ...], ...] = ()

    def match(self, adaptor: Adaptor) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.match(adaptor) for s in conj) for conj in self.alternatives)


def parse_all(filters: Iterable[str]) -> Filter:
    """Parse List's filter strings (OR of them); raises FilterSyntaxError naming the bad filter."""
    alternatives = []
    for text in filters:
        if text == "":
            return Filter()  # containerd: an empty filter string matches everything
        alternatives.append(_Parser(text).parse())
    return Filter(tuple(alternatives))


class _Scanner:
    """containerd's filter scanner: runes, with a `value` mode right after an operator."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0  # start of the current rune
        self.ppos = 0  # just past it
        self.value = False
        self.err = ""

    def next(self) -> str:
        if self.ppos >= len(self.text):
            self.pos = self.ppos
            return _EOF
        self.pos = self.ppos
        ch = self.text[self.ppos]
        self.ppos += 1
        if ch == "\x00":
            self._error("unexpected null character")
            return _ILLEGAL
        return ch

    def peek(self) -> str:
        pos, ppos = self.pos, self.ppos
        ch = self.next()
        self.pos, self.ppos = pos, ppos
        return ch

    def scan(self) -> tuple[int, str, str]:
        ch = self.next()
        while ch not in (_EOF, _ILLEGAL) and ch.isspace():
            ch = self.next()
        pos = self.pos
        if ch in (_EOF, _ILLEGAL):
            return pos, ch, ""
        if ch in _QUOTES:
            if not self._scan_quoted(ch):
                return pos, _ILLEGAL, self.text[pos : self.ppos]
            return pos, _QUOTED, self.text[pos : self.ppos]
        if ch in ",.":
            self.value = False
            return pos, _SEPARATOR, ch
        if ch in "=!~":
            while self.peek() in ("=", "!", "~"):
                self.next()
            self.value = True
            return pos, _OPERATOR, self.text[pos : self.ppos]
        if self.value:
            while (c := self.peek()) not in (_EOF, _ILLEGAL) and c != "," and not c.isspace() and c.isprintable():
                self.next()
            self.value = False
            return pos, _VALUE, self.text[pos : self.ppos]
        if _is_field_char(ch):
            while (c := self.peek()) not in (_EOF, _ILLEGAL) and _is_field_char(c):
                self.next()
            return pos, _FIELD, self.text[pos : self.ppos]
        return pos, ch, ""

    def _scan_quoted(self, quote: str) -> bool:
        ch = self.next()
        while ch != quote:
            if ch in (_EOF, _ILLEGAL) or ch == "\n":
                self._error("quoted literal not terminated")
                return False
            if ch == "\\":
                ch = self.next()
                if ch in (_EOF, _ILLEGAL):
                    self._error("quoted literal not terminated")
                    return False
            ch = self.next()
        return True

    def _error(self, message: str) -> None:
        self.err = self.err or message


def _is_field_char(ch: str) -> bool:
    return ch in "-_" or ("a" <= ch <= "z") or ("A" <= ch <= "Z") or ("0" <= ch <= "9")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.scanner = _Scanner(text)

    def parse(self) -> tuple[Selector, ...]:
        selectors = [self._selector()]
        while True:
            ch = self.scanner.peek()
            if ch == _EOF:
                return tuple(selectors)
            if ch != ",":
                raise self._error(self.scanner.ppos, f"unexpected input {ch!r}")
            self.scanner.scan()
            selectors.append(self._selector())

    def _selector(self) -> Selector:
        fieldpath = self._fieldpath()
        if self.scanner.peek() in (",", _EOF):
            return Selector(tuple(fieldpath), "present")
        operator = self._operator()
        value = self._value(alt_quotes=operator == "~=")
        pattern = None
        if operator == "~=":
            try:
                pattern = re.compile(value)
            except re.error as e:
                raise FilterSyntaxError(f"invalid filter {self.text!r}: bad regular expression {value!r}: {e}") from None
        return Selector(tuple(fieldpath), operator, value, pattern)

    def _fieldpath(self) -> list[str]:
        fields = [self._field()]
        while self.scanner.peek() == ".":
            self.scanner.scan()
            fields.append(self._field())
        return fields

    def _field(self) -> str:
        pos, tok, text = self.scanner.scan()
        if tok == _FIELD:
            return text
        if tok == _QUOTED:
            return self._unquote(pos, text, alt_quotes=False)
        raise self._error(pos, "expected a field name or a quoted field")

    def _operator(self) -> str:
        pos, tok, text = self.scanner.scan()
        if tok != _OPERATOR:
            raise self._error(pos, 'expected an operator ("==", "!=" or "~=")')
        if text not in ("==", "!=", "~="):
            raise self._error(pos, f"unsupported operator {text!r}")
        return text

    def _value(self, alt_quotes: bool) -> str:
        pos, tok, text = self.scanner.scan()
        if tok in (_VALUE, _FIELD):
            return text
        if tok == _QUOTED:
            return self._unquote(pos, text, alt_quotes)
        if tok == _EOF:
            raise self._error(pos, "expected a value after the operator")
        raise self._error(pos, "expected a value or a quoted value")

    def _unquote(self, pos: int, text: str, alt_quotes: bool) -> str:
        if not alt_quotes and text[0] != '"':
            raise self._error(pos, f"{text[0]!r} quotes are only allowed for regular expressions (after ~=)")
        try:
            return unquote(text)
        except ValueError as e:
            raise self._error(pos, f"bad quoted string: {e}") from None

    def _error(self, pos: int, message: str) -> FilterSyntaxError:
        if self.scanner.err:
            message = f"{message} ({self.scanner.err})"
        return FilterSyntaxError(f"invalid filter {self.text!r} at offset {pos}: {message}")


def unquote(text: str) -> str:
    """Go string-literal unquoting, with `/` and `|` allowed as the quote character (containerd's rule)."""
    if len(text) < 2 or text[0] != text[-1] or text[0] not in _QUOTES:
        raise ValueError("unbalanced quotes")
    quote, body = text[0], text[1:-1]
    if "\n" in body:
        raise ValueError("newline in quoted string")
    out: list[str] = []
    raw = bytearray()  # \x and octal escapes produce bytes, like Go

    def flush() -> None:
        if raw:
            out.append(raw.decode("utf-8", "surrogateescape"))
            raw.clear()

    i = 0
    while i < len(body):
        ch = body[i]
        if ch == quote:
            raise ValueError(f"unescaped {quote!r} inside the quotes")
        if ch != "\\":
            flush()
            out.append(ch)
            i += 1
            continue
        if i + 1 >= len(body):
            raise ValueError("trailing backslash")
        esc = body[i + 1]
        i += 2
        if esc in _ESCAPES:
            flush()
            out.append(_ESCAPES[esc])
        elif esc in "'\"|/":
            if esc != quote:
                raise ValueError(f"\\{esc} is not a valid escape inside {quote}...{quote}")
            flush()
            out.append(esc)
        elif esc in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[esc]
            digits = body[i : i + n]
            if len(digits) < n or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise ValueError(f"\\{esc} needs {n} hex digits")
            value = int(digits, 16)
            i += n
            if esc == "x":
                raw.append(value)
            else:
                if value > 0x10FFFF:
                    raise ValueError("escape beyond the last Unicode code point")
                flush()
                out.append(chr(value))
        elif esc in "01234567":
            digits = body[i - 1 : i + 2]
            if len(digits) < 3 or not all(c in "01234567" for c in digits) or int(digits, 8) > 255:
                raise ValueError("octal escapes need three digits up to \\377")
            raw.append(int(digits, 8))
            i += 2
        else:
            raise ValueError(f"unknown escape \\{esc}")
    flush()
    return "".join(out)


def snapshot_fields(name: str, parent: str, kind: str, labels: dict[str, str]) -> Adaptor:
    """The field lookup of one snapshot, as containerd's snapshot adaptor defines it."""

    def lookup(fieldpath: list[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        head = fieldpath[0]
        if head == "kind":
            return kind, True
        if head == "name":
            return name, True
        if head == "parent":
            return parent, True
        if head == "labels":
            if not labels:
                return "", False
            key = ".".join(fieldpath[1:])
            return (labels[key], True) if key in labels else ("", False)
        return "", False

    return lookup
