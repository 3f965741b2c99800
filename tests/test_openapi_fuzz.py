"""schemathesis over the server's own OpenAPI document (the gateway layer and /v1/embeddings
included), with a small example budget: no input, valid or not, gets a 5xx, and every answer has a
status the document declares."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, status_code_conformance

from shoal.gateway.config import GatewayConfig
from shoal.gateway.setup import build_gateway
from tests._server_util import MODEL_NAME, fast_engine, serve


@pytest.fixture(scope="module")
def api_schema():
    engine = fast_engine(max_model_len=128)
    server, _ = serve(engine, max_waiting=64, gateway=build_gateway(GatewayConfig.single(MODEL_NAME)))
    yield schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    server.stop()


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_input_gets_a_5xx(case):
    response = case.call(timeout=60)
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance])
