"""The eval/export options that change the lite default: parsed once, refused with the fix."""

from __future__ import annotations

import pytest

from o2n_edge.profiles import get_profile, with_options


def test_brightness_tolerance_takes_off_or_a_fraction() -> None:
    lite = get_profile("lite")
    assert lite.brightness_tolerance == 0.05
    assert with_options(lite, brightness="off").brightness_tolerance is None
    assert with_options(lite, brightness="0.2").brightness_tolerance == 0.2
    for bad in ("-0.1", "2", "bright"):
        with pytest.raises(ValueError, match="--brightness-tolerance"):
            with_options(lite, brightness=bad)


def test_search_dims_and_bank_rows_reach_the_scoring_config() -> None:
    from o2n_edge.runtime.scoring import ScoringConfig

    prof = with_options(get_profile("lite"), search_dims=32, bank_rows=2048)
    assert prof.bank_max_rows == 2048
    assert ScoringConfig.from_profile(prof, ("pool",)).search_dims == 32
    for bad in (-1, True, 2.5):
        with pytest.raises(ValueError, match="--search-dims"):
            with_options(get_profile("lite"), search_dims=bad)


def test_search_precision_reaches_the_scoring_config() -> None:
    from o2n_edge.runtime.scoring import ScoringConfig

    assert get_profile("lite").search_precision == "int8"  # CPU profile: int8 search, re-ranked
    assert get_profile("sd15").search_precision == "float32"  # GPU profile: exact on the device
    prof = with_options(get_profile("lite"), search_precision="int8")
    assert ScoringConfig.from_profile(prof, ("pool",)).search_precision == "int8"
    with pytest.raises(ValueError, match="--search-precision"):
        with_options(get_profile("lite"), search_precision="int4")
