"""Fixtures the adapter tests share."""
import pytest

from bench.star import star_dataset
from hyperreal.loading import load_base


@pytest.fixture()
def base():
    """A fresh base per test: adapters attached here never reach the session-wide ``tiny`` fixture."""
    return load_base("tiny")


@pytest.fixture(scope="module")
def stars(tmp_path_factory):
    """Four rendered stars captioned "a <colour> sks star"."""
    return star_dataset(tmp_path_factory.mktemp("stars"), n=4)
