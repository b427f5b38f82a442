"""Column specs: one string per field of `manytask shards write --features / --targets`,
parsed and matched against a table's columns (what each spec means: data_pipeline/preprocess.py).

    [FIELD=]COLUMNS[:KIND][:OPTION...]
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

KINDS = ("cat", "hash", "multi", "num", "eq")


class SpecError(ValueError):
    """A column spec that cannot be used; the message names the spec and what was expected."""



@dataclass
class ColumnSpec:
    """One parsed column spec (see the module docstring)."""

    text: str
    field: str
    columns: list[str]
    role: str = "input"  # input | target
    kind: str = ""  # one of KINDS, or "" = decided by the column's type
    min_count: int = 1
    max_vocab: int = 0
    buckets: int = 0
    k: int = 0
    sep: str = "|"
    standardize: bool = True
    log: bool = False
    fill: float | str | None = None  # None = refuse missing values; a number or "mean"
    equals: str = ""


_INT_OPTIONS = ("min_count", "max_vocab", "k")


def parse_spec(text: str, role: str = "input", min_count: int = 1, max_vocab: int = 0) -> ColumnSpec:
    """`[FIELD=]COLUMNS[:KIND][:OPTION...]` -> ColumnSpec (columns not yet matched to a table)."""
    head, *opts = text.split(":")
    name, _, cols = head.partition("=") if "=" in head else (head, "", head)
    spec = ColumnSpec(text, name.strip(), [c.strip() for c in cols.split(",") if c.strip()], role,
                      min_count=min_count, max_vocab=max_vocab)
    if not spec.field or not spec.columns:
        raise SpecError(f"column spec '{text}': expected [FIELD=]COLUMN[:KIND][:OPTION...]")
    for opt in opts:
        key, has_value, value = opt.partition("=")
        key = key.strip()
        if key in KINDS:
            if spec.kind:
                raise SpecError(f"column spec '{text}': two kinds ('{spec.kind}' and '{key}')")
            spec.kind = key
            if key == "hash":
                spec.buckets = _int(text, key, value, minimum=2)
            elif key == "eq":
                if not has_value:
                    raise SpecError(f"column spec '{text}': 'eq' needs a value (eq=VALUE)")
                spec.equals = value
            elif has_value:
                raise SpecError(f"column spec '{text}': kind '{key}' takes no value")
        elif key in _INT_OPTIONS:
            setattr(spec, key, _int(text, key, value, minimum=1 if key != "max_vocab" else 0))
        elif key == "sep" and has_value:
            spec.sep = value or "|"
        elif key == "raw" and not has_value:
            spec.standardize = False
        elif key == "log" and not has_value:
            spec.log = True
        elif key == "fill" and has_value:
            spec.fill = "mean" if value == "mean" else _float(text, value)
        elif key == "missing" and value == "error":
            spec.fill = None
        else:
            raise SpecError(
                f"column spec '{text}': unknown option '{opt}' (kinds: {', '.join(KINDS)}; options: "
                "min_count=N, max_vocab=N, k=N, sep=S, raw, log, fill=V|mean, missing=error)"
            )
    if spec.kind == "multi" and not spec.k:
        raise SpecError(f"column spec '{text}': 'multi' needs the list width k=N")
    return spec


def _int(text: str, key: str, value: str, minimum: int) -> int:
    try:
        out = int(value)
    except ValueError:
        out = minimum - 1
    if out < minimum:
        raise SpecError(f"column spec '{text}': '{key}' must be an integer >= {minimum}, got '{value}'")
    return out


def _float(text: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise SpecError(f"column spec '{text}': fill must be a number or 'mean', got '{value}'") from None


def resolve_specs(specs: list[ColumnSpec], columns: dict[str, str]) -> list[ColumnSpec]:
    """Match each spec's columns (globs allowed) against the table's `columns` (name -> kind
    from table_reader) and decide an empty kind from the column type; SpecError names the spec."""
    names = list(columns)
    for spec in specs:
        picked = []
        for c in spec.columns:
            match = fnmatch.filter(names, c) if any(ch in c for ch in "*?[") else [c] if c in columns else []
            if not match:
                raise SpecError(f"column spec '{spec.text}': no column '{c}' (columns: {', '.join(names[:30])})")
            picked += match
        spec.columns = picked
        types = {columns[c] for c in picked}
        if not spec.kind:
            if types & {"string", "list"}:
                spec.kind = "multi" if "list" in types else "cat"
                if spec.kind == "multi":
                    raise SpecError(f"column spec '{spec.text}': a list column needs ':multi:k=N'")
        if spec.kind in ("cat", "hash", "multi", "eq") and len(picked) != 1:
            raise SpecError(f"column spec '{spec.text}': kind '{spec.kind}' takes one column")
        if spec.kind in ("", "num") and types - {"float", "int", "bool"}:
            raise SpecError(f"column spec '{spec.text}': columns {picked} are {sorted(types)}; "
                            "a numeric field needs numeric columns (use :cat, :hash or :multi)")
    seen: dict[str, str] = {}
    for spec in specs:
        for name in [spec.field] + ([f"{spec.field}_missing"] if spec.fill is not None and spec.kind == "num" else []):
            if name in seen:
                raise SpecError(f"field '{name}' is made by both '{seen[name]}' and '{spec.text}'")
            seen[name] = spec.text
    return specs

