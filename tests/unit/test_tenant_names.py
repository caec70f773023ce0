"""A tenant's name is a segment of its store keys: refused at settings load unless it is safe as
one."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from routing.settings import Settings


def tenants(*names: str) -> dict[str, dict[str, object]]:
    return {name: {"api_keys": ["k"], "webhook_secret": "whsec_c2VjcmV0"} for name in names}


def test_names_safe_as_a_key_segment_are_accepted_up_to_64_characters_and_no_more():
    names = ("a", "acme-prod", "t_1", "9lives", "a" * 64)
    assert set(Settings(tenants=tenants(*names)).tenants) == set(names)
    with pytest.raises(ValidationError, match="tenant name"):
        Settings(tenants=tenants("a" * 65))


@pytest.mark.parametrize("name", ["", "Acme", "../a", "a/b", "_a", "-a", ".a", "a b", "a.b"])
def test_other_names_are_refused_at_load(name: str):
    with pytest.raises(ValidationError, match="tenant name"):
        Settings(tenants=tenants(name))
