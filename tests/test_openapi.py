"""The OpenAPI document: valid 3.1, served at /openapi.json, and exactly the routes pusherd has."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from aiohttp import web
from openapi_spec_validator import validate

import pusherd
from pusherd.api.routes import path_forms
from pusherd.app import create_app
from pusherd.keys import INGEST_APP
from pusherd.openapi import document
from tests.conftest import Harness, make_config

DOCUMENT = Path(pusherd.__file__).parent / "openapi.json"
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
INGEST_PATHS = {"/events", "/metrics"}
PUBLIC = {("get", "/healthz"), ("get", "/openapi.json"), ("get", "/metrics"), ("post", "/events")}


def _doc() -> dict[str, Any]:
    """The served document: the shipped file plus the other forms of its paths."""
    return document()


def _canonical(doc_path: str) -> str:
    """The path of the shipped document that `doc_path` is a form of."""
    shipped = json.loads(DOCUMENT.read_text())["paths"]
    (canonical,) = [p for p in shipped if doc_path in [form for form, _ in path_forms(p)]]
    return canonical


def _routes(app: web.Application) -> set[tuple[str, str]]:
    out = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        assert path, route
        out.add((route.method.lower(), re.sub(r"\{(\w+)(:[^}]*)?\}", r"{\1}", path)))
    return out


def _operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m, path) for path, item in doc["paths"].items() for m in item if m in METHODS}


def test_document_is_valid_openapi_3_1() -> None:
    doc = _doc()
    assert doc["openapi"].startswith("3.1.")
    validate(doc)


def test_every_registered_route_is_documented_and_vice_versa(tmp_path: Path) -> None:
    app = create_app(make_config(tmp_path))
    registered = _routes(app) | _routes(app[INGEST_APP])
    assert registered == _operations(_doc())


def test_ingest_operations_name_the_ingest_listener(tmp_path: Path) -> None:
    doc = _doc()
    ingest = {p for m, p in _routes(create_app(make_config(tmp_path))[INGEST_APP])}
    for path in INGEST_PATHS:
        assert path in ingest
        assert "ingest" in doc["paths"][path]["servers"][0]["url"]
    for path, item in doc["paths"].items():
        if _canonical(path) not in INGEST_PATHS:
            assert "servers" not in item, path


def _resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def test_operations_declare_their_errors_and_security() -> None:
    doc = _doc()
    assert doc["security"] == [{"bearerAuth": []}]
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for method, path in _operations(doc):
        op = doc["paths"][path][method]
        responses = op["responses"]
        assert any(code.startswith("2") for code in responses), (method, path)
        public = (method, _canonical(path)) in PUBLIC
        assert ("security" in op and op["security"] in ([], [{}, {"ingestToken": []}])) == public
        if not public:
            assert {"401", "429"} <= set(responses), (method, path)
        for code, response in responses.items():
            if code.startswith(("4", "5")):
                content = _resolve(doc, response)["content"]["application/json"]
                assert content["schema"] == {"$ref": "#/components/schemas/Error"}, (path, code)


async def test_document_is_served_without_a_token(harness: Harness) -> None:
    resp = await harness.api.get("/openapi.json")
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert await resp.json() == _doc()
    assert (await harness.ingest.get("/openapi.json")).status == 404


def test_every_path_is_also_documented_with_a_trailing_slash_and_the_uuid_form() -> None:
    doc = _doc()
    shipped = json.loads(DOCUMENT.read_text())
    single = "/organizations/{organizationUuid}/subscriptions/{subscriptionUuid}"
    alias = "/organizations/{organizationUuid}/subscriptions/uuid/{subscriptionUuid}"
    for path in shipped["paths"]:
        assert path + "/" in doc["paths"], path
    for path in (alias, alias + "/"):
        assert set(doc["paths"][path]) >= {"get", "put", "delete"}
    assert doc["paths"][alias + "/"]["delete"]["operationId"] == "deleteSubscriptionUuidPathSlash"
    assert doc["paths"][single]["get"]["operationId"] == "getSubscription"
    ids = [op["operationId"] for m, path in _operations(doc) for op in [doc["paths"][path][m]]]
    assert len(ids) == len(set(ids))
