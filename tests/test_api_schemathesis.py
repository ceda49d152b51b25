"""A bounded schemathesis run against a real ``parrot serve``'s
``/openapi.json``: every operation, generated requests (a few hundred in
all, with a tenant's key, the admin key on the admin routes, and a real
open session of the tenant in the session routes' paths so bodies reach the
service's checks), and no answer is a 5xx.

The operations are driven through schemathesis' Python API (one hypothesis
run per operation) rather than its pytest plugin, which does not load under
the pytest this project tests with.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

#: Examples per operation: about 25 operations, so a few hundred requests.
EXAMPLES = 15
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def test_no_generated_request_is_a_server_error(live_server):
    key = live_server.new_tenant("schemathesis", tokens_per_minute=20_000, max_prompt_tokens=256)
    with live_server.client(key) as c:
        session_id = c.post("/api/v1/sessions").json()["session_id"]
    schema = schemathesis.openapi.from_url(live_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    sent: dict[str, int] = {}
    failures: list[str] = []

    for operation in operations:
        admin = operation.path.startswith("/admin/") or operation.path == "/metrics"
        headers = {"Authorization": f"Bearer {live_server.ADMIN_KEY if admin else key}"}
        streams = operation.path.endswith("/events")

        @FUZZ
        @given(case=operation.as_strategy())
        def run(case) -> None:
            # Not in the live event stream: it lasts as long as the session.
            if "session_id" in (case.path_parameters or {}) and case.method != "DELETE" and not streams:
                case.path_parameters["session_id"] = session_id
            # Bounded: a generated request may ask for a long stream or a long poll.
            response = case.call(base_url=live_server.url, headers=headers, timeout=60)
            sent[operation.label] = sent.get(operation.label, 0) + 1
            case.validate_response(response, checks=[not_a_server_error])

        try:
            run()
        except Exception as exc:  # noqa: BLE001  (collected: every operation is tried)
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert sum(sent.values()) >= 200, sent
