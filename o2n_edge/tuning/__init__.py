"""Self-tuning of the detection settings from the shots alone (issue 11).

:mod:`.synthetic` makes defects, :mod:`.features` encodes once per resolution and composes layer
settings from the cached backbone maps, :mod:`.search` runs the leave-one-shot-out
pseudo-validation and picks a :class:`Candidate`; :data:`LITE_CANDIDATES` is what the lite
profile chooses from.
"""

from __future__ import annotations

from .search import Candidate, candidate_from_record, pseudo_validate

__all__ = ["Candidate", "candidate_from_record", "pseudo_validate"]
