"""Counting bad input instead of crashing on it or dropping it silently.

Every reader hands each problem it meets to a ``Report``: a *problem* is input that cannot be used
as it is (a malformed line, an id missing from the maps, a corrupt image, an item without
metadata) and is skipped; a *repair* is input that was used after a lossless, well-defined fix (an
HTML entity unescaped, a CMYK image converted to RGB, a duplicate user-item pair collapsed).
Both are counted per reason with the first few ``file:line`` examples. ``strict`` turns the first
problem into a ``BadInputError``; repairs stay notes, because refusing every Amazon title that
contains ``&amp;`` would make strict mode unusable on the real dumps.
"""
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

MAX_EXAMPLES = 5


class BadInputError(ValueError):
    """Raised in strict mode for the first problem; the message names file and line."""


class ConvertError(ValueError):
    """The input, or the options given, cannot make a dataset (nothing read, nothing left, a bad option)."""


class InputFileError(ValueError):
    """An input file cannot be read at all (truncated or not-gzip ``.gz``, missing layout file).

    The message is one line naming the file and the line or byte offset where reading stopped.
    """


def where(path, line: Optional[int] = None) -> str:
    """``file:line`` (or just ``file``) as shown in examples and errors."""
    return f"{path}:{line}" if line is not None else str(path)


@dataclass
class Reason:
    kind: str  # "problem" (input skipped) or "repair" (input fixed and used)
    count: int = 0
    examples: List[str] = field(default_factory=list)  # first MAX_EXAMPLES "file:line: detail"


class Report:
    """Per-reason counts and examples, shared by every stage of one conversion."""

    def __init__(self, strict: bool = False, max_examples: int = MAX_EXAMPLES):
        self.strict = strict
        self.max_examples = max_examples
        self.reasons: Dict[str, Reason] = OrderedDict()
        self.notes: List[str] = []  # free-form lines (policy decisions, counts of dropped items)

    def _add(self, kind, reason, path, line, detail):
        entry = self.reasons.setdefault(reason, Reason(kind))
        entry.count += 1
        if len(entry.examples) < self.max_examples:
            text = where(path, line) + f": {detail}" if detail else where(path, line)
            entry.examples.append(text)

    def problem(self, reason: str, path, line: Optional[int] = None, detail: str = ""):
        """Input that is skipped; in strict mode an error naming ``path:line``."""
        if self.strict:
            msg = f"{where(path, line)}: {reason}"
            raise BadInputError(msg + (f": {detail}" if detail else "") + " (strict mode)")
        self._add("problem", reason, path, line, detail)

    def repair(self, reason: str, path, line: Optional[int] = None, detail: str = ""):
        """Input that was fixed and used; never an error, always counted."""
        self._add("repair", reason, path, line, detail)

    def note(self, text: str):
        self.notes.append(text)

    def count(self, reason: str) -> int:
        entry = self.reasons.get(reason)
        return entry.count if entry else 0

    @property
    def n_problems(self) -> int:
        return sum(r.count for r in self.reasons.values() if r.kind == "problem")

    def to_dict(self) -> dict:
        return {
            "strict": self.strict,
            "problems": {k: {"count": r.count, "examples": r.examples}
                         for k, r in self.reasons.items() if r.kind == "problem"},
            "repairs": {k: {"count": r.count, "examples": r.examples}
                        for k, r in self.reasons.items() if r.kind == "repair"},
            "notes": list(self.notes),
        }

    def one_line(self) -> str:
        """Per-reason counts with the first example each, on one line (for an abort message)."""
        parts = [f"{r.count} x {reason} (e.g. {r.examples[0]})" if r.examples else f"{r.count} x {reason}"
                 for reason, r in self.reasons.items() if r.kind == "problem"]
        return "; ".join(parts) if parts else "no input line was skipped"

    def format(self) -> str:
        """Human-readable summary printed at the end of a conversion."""
        lines = []
        for kind, title in (("problem", "skipped input"), ("repair", "repaired input")):
            items = [(k, r) for k, r in self.reasons.items() if r.kind == kind]
            if not items:
                continue
            lines.append(f"{title}:")
            for reason, entry in items:
                lines.append(f"  {entry.count:>8}  {reason}")
                for ex in entry.examples:
                    lines.append(f"            e.g. {ex}")
        if not any(r.kind == "problem" for r in self.reasons.values()):
            lines.insert(0, "no input was skipped")
        for n in self.notes:
            lines.append(f"note: {n}")
        return "\n".join(lines)


class Deferred:
    """Records item-level findings while a metadata file is parsed, replayed only for used items.

    Raw metadata dumps describe far more items than survive into the dataset; an empty title on an
    item nobody interacted with must neither clutter the report nor fail a strict run.
    """

    def __init__(self):
        self.entries = []  # (kind, reason, path, line, detail)

    def problem(self, reason, path, line=None, detail=""):
        self.entries.append(("problem", reason, path, line, detail))

    def repair(self, reason, path, line=None, detail=""):
        self.entries.append(("repair", reason, path, line, detail))

    def replay(self, report: Report):
        for kind, reason, path, line, detail in self.entries:
            getattr(report, kind)(reason, path, line, detail)
