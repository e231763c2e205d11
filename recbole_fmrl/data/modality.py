"""Item modalities: which frozen feature tables (or a learned ID table) represent the items.

One home for ``fmrl_modality``: its choices, the feature tables each reads, and how ``auto`` resolves
against the tables a dataset has.
"""
MODALITY_CHOICES = ("text_image", "text", "image", "id")


def modality_parts(modality: str) -> list:
    """Feature tables a modality setting reads, e.g. 'text_image' -> ['text', 'image']."""
    if modality not in MODALITY_CHOICES:
        raise ValueError(f"fmrl_modality: unknown value {modality!r}; expected one of {MODALITY_CHOICES}")
    return [] if modality == "id" else modality.split("_")


def wants_text(requested) -> bool:
    """Whether a requested modality (``auto`` included) would read a text table."""
    return requested in (None, "auto") or "text" in modality_parts(requested)


def resolve_modality(requested, found, where: str = "") -> str:
    """The concrete modality of a run: ``requested``, or for ``auto`` every table in ``found``."""
    if requested in (None, "auto"):
        if not found:
            raise ValueError(
                f"fmrl_modality=auto: no item features in {where or 'the dataset folder'}; build them with "
                f"`python -m dataset_tools features` or set fmrl_modality=id")
        return "text_image" if set(found) >= {"text", "image"} else found[0]
    if requested not in MODALITY_CHOICES:
        raise ValueError(f"fmrl_modality: unknown value {requested!r}; expected auto or one of {MODALITY_CHOICES}")
    return requested
