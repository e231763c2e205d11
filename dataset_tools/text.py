"""Item text as the paper builds it: one ``Label: value`` line per available field.

fMRLRec writes "Title: ...\\nPrice: ...\\nBrand: ...\\nCategories: ..." from title, price, brand
and the first category path, skipping missing fields, lists joined with ", ". The reference
leaves a trailing newline when categories are missing; joining with "\\n" instead is identical
for every tokenizer that treats whitespace as a separator (BERT/BGE/MiniLM), and cleaner.
"""
from typing import Dict, Iterable, List, Optional

from dataset_tools.report import ConvertError

# Field name -> label printed in the template. Unknown fields get a label from their name.
LABELS = {
    "title": "Title",
    "movie_title": "Title",
    "price": "Price",
    "brand": "Brand",
    "categories": "Categories",
    "category": "Categories",
    "year": "Year",
    "release_year": "Year",
    "genres": "Genres",
    "class": "Genres",
    "overview": "Overview",
    "description": "Description",
    "abstract": "Abstract",  # ml-1m-posters: the movie's DBpedia abstract
    "keyphrase": "Keyphrase",  # P5 --keyphrases: derived words, not a title
}

AMAZON_FIELDS = ["title", "price", "brand", "categories"]
MOVIELENS_FIELDS = ["title", "year", "genres", "overview"]

# Used only under the ``keep`` missing-text policy, as the reference code does.
PLACEHOLDER = "Untitled Item"


def label(field: str) -> str:
    return LABELS.get(field, field.replace("_", " ").strip().capitalize())


def value_text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v).strip() for v in value if str(v).strip())
    return str(value).strip()


def item_text(fields: Dict[str, object], order: Iterable[str]) -> str:
    """The template text for one item; "" when none of the selected fields has a value."""
    lines = []
    for name in order:
        value = fields.get(name)
        if value is None:
            continue
        text = value_text(value)
        if text:
            lines.append(f"{label(name)}: {text}")
    return "\n".join(lines)


def parse_fields(spec: Optional[str], default: List[str]) -> List[str]:
    """``--text-fields title,brand`` -> ["title", "brand"]; None -> the format's default."""
    if not spec:
        return list(default)
    fields = [f.strip() for f in spec.split(",") if f.strip()]
    if not fields:
        raise ConvertError(f"--text-fields {spec!r} names no field")
    return fields
