"""Every Redis script call keeps all its keys in one Cluster slot (hypothesis over names)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from gateway.quotas import QuotaScope, windows
from gateway.state.redis import admit_call, binding_key, settle_call, tenant_key

names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=24)
tenant_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,30}", fullmatch=True)


def _slots(keys: list[str]) -> set[int]:
    return {key_slot(k.encode()) for k in keys}


@settings(max_examples=300)
@given(
    tenant=tenant_names,
    model=names,
    once=st.none() | names,
    lease=st.none() | names,
    per_model=st.booleans(),
)
def test_each_script_call_stays_in_one_slot(
    tenant: str, model: str, once: str | None, lease: str | None, per_model: bool
) -> None:
    scopes = [QuotaScope(tenant, "", 10, 100, 1000, 10000, 2)]
    if per_model:
        scopes.append(QuotaScope(tenant, model, 5, 50, 500, 5000, 1))
    w = windows()
    keys, _ = admit_call(scopes, lease or "l", 300, w)
    assert _slots(keys) == {key_slot(tenant_key(tenant).encode())}
    keys, _ = settle_call(scopes, lease, 7, w, once, 3600)
    assert _slots(keys) == {key_slot(tenant_key(tenant).encode())}


@given(object_id=st.from_regex(r"[A-Za-z0-9_\-]{1,64}", fullmatch=True))
def test_a_binding_is_one_key(object_id: str) -> None:
    assert object_id in binding_key(object_id)
