"""Per-tenant id namespaces for caller-chosen variable and call ids.

A client may name its variables and calls (``var_id``, ``call_id``,
``outputs``). Those names are the tenant's own: tenant B creating an id that
tenant A uses succeeds in B's namespace and never tells B that A's exists.
The service keeps one graph and one store for every tenant, so an id is kept
there as ``<tenant id>/<id as the client wrote it>`` (the *internal* id) and
shown to the client without the prefix (the *public* id). Public ids never
contain ``/`` (the API's id pattern forbids it, and server-made ids have
none), so the mapping is one to one, and the stored records are in internal
ids: a restore from Redis reads them back into the same namespaces.
"""

from __future__ import annotations

from typing import Any

SEPARATOR = "/"

#: Keys of the JSON views and events whose values are ids (or, for
#: ``error``, text that may quote one): only these are made public, never
#: a variable's value or a prompt's text.
ID_KEYS = frozenset({
    "call_id", "var_id", "producer", "consumer", "members", "group", "group_id", "inputs", "outputs", "error",
})


def internal_id(tenant_id: str, public_id: str) -> str:
    """The id a tenant's ``public_id`` is kept under in the graph and the store."""
    return f"{tenant_id}{SEPARATOR}{public_id}"


def public_text(tenant_id: str, text: str) -> str:
    """``text`` (an id, or a message quoting ids) with the tenant's prefix removed."""
    return text.replace(f"{tenant_id}{SEPARATOR}", "")


def _public_ids(tenant_id: str, value: Any) -> Any:
    """An id-valued field made public: a string, a list of them, or a name -> id map."""
    if isinstance(value, str):
        return public_text(tenant_id, value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [public_text(tenant_id, v) for v in value]
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return {k: public_text(tenant_id, v) for k, v in value.items()}
    return public_view(tenant_id, value)


def public_view(tenant_id: str, view: Any) -> Any:
    """A JSON view (DAG, call detail, event) with every id field made public."""
    if isinstance(view, dict):
        return {k: _public_ids(tenant_id, v) if k in ID_KEYS else public_view(tenant_id, v) for k, v in view.items()}
    if isinstance(view, list):
        return [public_view(tenant_id, v) for v in view]
    return view
