"""The dataset registry and the published reference rows."""

from __future__ import annotations

import pytest

from opsd_jax.eval.datasets import DATASET_NAMES, DATASETS, REFERENCE_RESULTS, get_dataset


def test_benchmark_order_tasks_and_lookup():
    assert DATASET_NAMES == (
        "mer2023",
        "mer2024",
        "meld",
        "iemocapfour",
        "cmumosi",
        "cmumosei",
        "sims",
        "simsv2",
        "ovmerdplus",
    )
    assert [d.primary_metric for d in DATASETS] == ["HIT"] * 4 + ["WAF"] * 4 + ["F_s"]
    assert get_dataset("IEMOCAPFour").test_size == 1241 and get_dataset(" OVMERDPlus ").task == "fine_grained"
    with pytest.raises(ValueError, match="unknown MER-UniBench dataset 'iemocap'; expected one of mer2023"):
        get_dataset("iemocap")


def test_reference_means_are_the_mean_of_their_rows():
    for reference in REFERENCE_RESULTS:
        if reference.per_dataset:
            assert set(reference.per_dataset) == set(DATASET_NAMES)
            assert sum(reference.per_dataset.values()) / 9 == pytest.approx(reference.mean, abs=0.005)
    assert [r.mean for r in REFERENCE_RESULTS] == [74.77, 64.17, 84.19]
