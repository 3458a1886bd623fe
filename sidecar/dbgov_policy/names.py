"""SQL identifiers as PostgreSQL reads them: unquoted names fold to lower case.

Policies name tables and functions the way a person writes SQL (`public.Customers` is
`public.customers`; `"Customers"` keeps its case), so the same folding applies to both sides
of every comparison.
"""

from __future__ import annotations


def _split(text: str) -> list[tuple[str, bool]]:
    """Split a dotted name into (part, was_quoted) pairs, honouring double quotes."""
    parts: list[tuple[str, bool]] = []
    i, n = 0, len(text)
    while True:
        if i < n and text[i] == '"':
            j, buf = i + 1, []
            while True:
                if j >= n:
                    raise ValueError(f"unterminated quoted identifier in {text!r}")
                if text[j] == '"':
                    if j + 1 < n and text[j + 1] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    break
                buf.append(text[j])
                j += 1
            part, quoted, i = "".join(buf), True, j + 1
        else:
            j = i
            while j < n and text[j] != ".":
                if text[j] == '"':
                    raise ValueError(f"misplaced quote in {text!r}")
                j += 1
            part, quoted, i = text[i:j].strip(), False, j
        if not part:
            raise ValueError(f"empty name part in {text!r}")
        parts.append((part, quoted))
        if i >= n:
            return parts
        if text[i] != ".":
            raise ValueError(f"expected '.' after a quoted identifier in {text!r}")
        i += 1


def parse_identifier(text: str) -> str:
    """One identifier, folded as PostgreSQL folds it."""
    parts = _split(text.strip())
    if len(parts) != 1:
        raise ValueError(f"expected one identifier, got {text!r}")
    part, quoted = parts[0]
    return part if quoted else part.lower()


def parse_qualified(text: str) -> tuple[str | None, str]:
    """`schema.name` or `name` → (schema or None, name), folded."""
    parts = _split(text.strip())
    if len(parts) > 2:
        raise ValueError(f"expected name or schema.name, got {text!r} ({len(parts)} parts)")
    folded = [p if quoted else p.lower() for p, quoted in parts]
    return (folded[0], folded[1]) if len(folded) == 2 else (None, folded[0])


def normalize_setting_value(text: str) -> str:
    """A setting value as a comparable list: `"$user", Public` → `$user,public`."""
    items = []
    for raw in text.split(","):
        item = raw.strip()
        if item.startswith('"') and item.endswith('"') and len(item) >= 2:
            items.append(item[1:-1])
        else:
            items.append(item.lower())
    return ",".join(items)
