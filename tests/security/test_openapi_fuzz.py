"""Schemathesis against the served OpenAPI schema: no 5xx, every response as documented.

The gateway runs for real (uvicorn, embedded mode, a real ONNX model, Redis, API keys) over the
multi-label tiny model, so every route answers with its success bodies too: classify and
moderation decisions (the LLM tier answering borderline labels through the fake LLM API),
policies, async acceptance and look-up. For every operation of the schema the gateway serves,
Schemathesis generates valid and invalid requests and checks each response: no server error,
a documented status code, content type and headers, a body matching the declared schema, and
invalid requests rejected.

The test drives Hypothesis itself over each operation's strategy (seeded, no deadline) rather
than through Schemathesis's pytest plugin, whose lazy-schema mode does not run under the
pytest this project uses.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.security.conftest import KEY_ALL

# Examples per operation and generation mode; about 40 s for the whole schema on two cores.
EXAMPLES = 100


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_response_conforms_to_the_served_schema(moderation_gateway, mode):
    """Generated requests to every served operation get documented, conforming, non-5xx answers."""
    schema = schemathesis.openapi.from_url(f"{moderation_gateway.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    served = {(op.method.upper(), op.path) for op in operations}
    assert ("POST", "/v1/classify") in served
    assert len(served) == len(operations) >= 8

    for operation in operations:
        inputs = [operation.body, operation.path_parameters, operation.query, operation.headers]
        if mode is GenerationMode.NEGATIVE and not any(inputs):
            continue  # nothing to make invalid (GET /healthz): the positive run covers it

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case):
            # Schema-valid requests may still be refused on their meaning (an unknown policy
            # name, a repeated id, an unknown message id): acceptance is not required of them.
            response = case.call_and_validate(
                headers={"Authorization": f"Bearer {KEY_ALL}"},
                excluded_checks=[positive_data_acceptance],
                timeout=60,
            )
            assert response.status_code < 500, response.text
            assert "Traceback" not in response.text

        check()
