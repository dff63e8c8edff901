"""WinCLIP-style prompt ensembles for the text branch.

The ensembles are the compositional prompts of WinCLIP (Jeong et al., CVPR 2023): state words
times templates. They are encoded once at export time; the runtime only stores two vectors.
"""

from __future__ import annotations

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
TEMPLATES = (
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the large {}.",
    "there is a {} in the scene.",
    "this is a {} in the scene.",
    "this is one {} in the scene.",
)


def prompt_ensemble(category: str, anomalous: bool) -> list[str]:
    """All prompts of one ensemble; underscores in category names read as spaces."""
    obj = category.replace("_", " ")
    states = ANOMALOUS_STATES if anomalous else NORMAL_STATES
    return [t.format(s.format(obj)) for s in states for t in TEMPLATES]
