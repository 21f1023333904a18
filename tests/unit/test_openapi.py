"""The served OpenAPI schema (gateway/openapi.py) and the URLs around it: off by default, behind
the admin key when on, no HTML docs pages; request bodies, answers and the error shape from
the pydantic models; and no trailing-slash redirects (a 404 with OpenAI's error body)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from backends.protocol import ChatCompletionRequest, CompletionRequest, error_body
from gateway.app import create_app
from gateway.openapi import OPERATIONS, ErrorBody, openapi_schema
from policies.schema import Config

ADMIN_KEY = "unit-admin-key-0123456789"
UNKNOWN_URL = "Unknown request URL. Please check the URL and method."


def make_app(**server: Any) -> FastAPI:
    return create_app(
        Config.model_validate(
            {
                "server": server,
                "backends": [{"name": "up", "kind": "remote", "model": "m", "url": "http://127.0.0.1:9/v1", "metrics_url": "none"}],
            }
        )
    )


def loopback(app: FastAPI) -> TestClient:
    return TestClient(app, client=("127.0.0.1", 50000))


@pytest.fixture
def schema() -> dict[str, Any]:
    return openapi_schema(make_app())


def assert_unknown_url(response: Any) -> None:
    assert response.status_code == 404
    assert response.json() == error_body(UNKNOWN_URL, "not_found_error")


# -- where the schema is served ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"])
def test_docs_are_off_by_default_and_answer_as_any_unknown_url(path: str) -> None:
    assert_unknown_url(loopback(make_app()).get(path))


def test_with_api_docs_the_schema_needs_the_admin_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNIT_ADMIN_KEY", ADMIN_KEY)
    client = loopback(make_app(api_docs=True, admin_key_env="UNIT_ADMIN_KEY"))
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/openapi.json", headers={"authorization": "Bearer wrong"}).status_code == 401
    response = client.get("/openapi.json", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200
    assert "/v1/chat/completions" in response.json()["paths"]
    for path in ("/docs", "/redoc"):  # no HTML pages (their assets come from a CDN), key or not
        assert_unknown_url(client.get(path, headers={"authorization": f"Bearer {ADMIN_KEY}"}))


def test_with_api_docs_and_no_admin_key_only_loopback_reads_it() -> None:
    app = make_app(api_docs=True)
    assert loopback(app).get("/openapi.json").status_code == 200
    response = TestClient(app, client=("10.1.2.3", 50000)).get("/openapi.json")
    assert response.status_code == 403 and response.json()["error"]["type"] == "permission_error"
    # A proxy on loopback (nginx) fronts remote callers: what it forwards is not from loopback.
    assert loopback(app).get("/openapi.json", headers={"x-forwarded-for": "203.0.113.9"}).status_code == 403


def test_the_schema_route_is_not_in_the_schema(schema: dict[str, Any]) -> None:
    assert "/openapi.json" not in schema["paths"]


# -- what the schema says -----------------------------------------------------------------------


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in refs(v)]
    return []


def resolve(schema: dict[str, Any], ref: str) -> Any:
    node: Any = schema
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_every_reference_resolves_and_no_422_is_left(schema: dict[str, Any]) -> None:
    for ref in refs(schema):
        resolve(schema, ref)
    for methods in schema["paths"].values():
        for operation in methods.values():
            assert "422" not in operation["responses"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]


def test_every_route_of_the_table_is_served_and_described(schema: dict[str, Any]) -> None:
    for method, path in OPERATIONS:
        operation = schema["paths"][path][method]
        assert operation["summary"] and operation["responses"]["200"]


@pytest.mark.parametrize(
    ("path", "model", "answer", "chunk"),
    [
        ("/v1/chat/completions", ChatCompletionRequest, "ChatCompletion", "ChatCompletionChunk"),
        ("/v1/completions", CompletionRequest, "Completion", "Completion"),
    ],
)
def test_generation_bodies_answers_and_streams(schema: dict[str, Any], path: str, model: type, answer: str, chunk: str) -> None:
    operation = schema["paths"][path]["post"]
    body = operation["requestBody"]["content"]["application/json"]
    assert operation["requestBody"]["required"] is True
    assert body["schema"] == {"$ref": f"#/components/schemas/{model.__name__}"}
    component = resolve(schema, body["schema"]["$ref"])
    assert set(component["required"]) == set(model.model_json_schema()["required"])
    assert set(component["properties"]) == set(model.model_fields)
    for example in body["examples"].values():
        model.model_validate(example["value"])  # the examples are valid requests
    ok = operation["responses"]["200"]["content"]
    assert ok["application/json"]["schema"] == {"$ref": f"#/components/schemas/{answer}"}
    data = ok["text/event-stream"]["schema"]["properties"]["data"]["anyOf"]
    assert {"const": "[DONE]"} in data
    assert {"$ref": f"#/components/schemas/{chunk}"} in data[1]["contentSchema"]["anyOf"]
    for status in ("400", "401", "403", "404", "413", "429", "500", "502", "503"):
        error = operation["responses"][status]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/ErrorBody"}
    assert "retry-after" in operation["responses"]["429"]["headers"]


def test_the_error_schema_is_what_the_gateway_writes(schema: dict[str, Any]) -> None:
    written = error_body("bad", "invalid_request_error", param="model", code=None)
    assert ErrorBody.model_validate(written).model_dump() == written
    component = schema["components"]["schemas"]["ErrorBody"]
    detail = resolve(schema, component["properties"]["error"]["$ref"])
    assert component["required"] == ["error"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}


def test_security_schemes_name_the_keys(schema: dict[str, Any]) -> None:
    assert schema["paths"]["/v1/models"]["get"]["security"][0] == {"apiKey": []}
    assert schema["paths"]["/admin/reload"]["post"]["security"] == [{"adminKey": []}]
    assert schema["paths"]["/healthz"]["get"]["security"] == []
    assert set(schema["components"]["securitySchemes"]) == {"apiKey", "azureApiKey", "adminKey"}


def test_the_schema_loads_in_schemathesis(schema: dict[str, Any]) -> None:
    import schemathesis

    loaded = schemathesis.openapi.from_dict(schema)
    labels = {result.ok().label for result in loaded.get_all_operations()}
    assert {f"{method.upper()} {path}" for method, path in OPERATIONS} <= labels


# -- no trailing-slash redirects ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("post", "/v1/chat/completions/"), ("post", "/v1/completions/"), ("get", "/healthz/"), ("get", "/metrics/")],
)
def test_a_trailing_slash_is_a_404_with_openais_body_not_a_redirect(method: str, path: str) -> None:
    client = TestClient(make_app(), follow_redirects=False)
    response = client.request(method, path, json={"model": "m", "prompt": "hi"} if method == "post" else None)
    assert_unknown_url(response)
    assert response.headers["x-request-id"]
