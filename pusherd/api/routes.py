"""The route table: every path answers in the shapes real clients send (SPEC §3).

Real Zettle clients put a trailing slash on every path, and the seed's own DELETE example (used by
the PayPal POS WooCommerce plugin) names a subscription `/subscriptions/uuid/{uuid}`. Rather than
duplicate handlers, each route is registered here under every form it answers to, and the OpenAPI
document derives its extra paths from the same `path_forms`, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web
from aiohttp.typedefs import Handler

SUBSCRIPTION = "/organizations/{organizationUuid}/subscriptions/{subscriptionUuid}"

# canonical path -> {operationId suffix: alias path}; the alias is the same resource.
ALIASES: Mapping[str, Mapping[str, str]] = {
    SUBSCRIPTION: {
        "UuidPath": "/organizations/{organizationUuid}/subscriptions/uuid/{subscriptionUuid}"
    },
}
SLASH_SUFFIX = "Slash"


def path_forms(path: str) -> list[tuple[str, str]]:
    """Every (form, operationId suffix) `path` answers to: itself first (suffix ""), then its
    aliases, each also with a trailing slash."""
    out: list[tuple[str, str]] = []
    for suffix, form in [("", path), *ALIASES.get(path, {}).items()]:
        out += [(form, suffix), (form + "/", suffix + SLASH_SUFFIX)]
    return out


def add(app: web.Application, path: str, handlers: Mapping[str, Handler]) -> None:
    """Register `handlers` (method → handler) under every form of `path`.

    One resource per form with all its methods, so a wrong method still answers 405 with the
    `Allow` header of that resource. GET answers no HEAD: nothing documents one.
    """
    for form, _ in path_forms(path):
        resource = app.router.add_resource(form)
        for method, handler in handlers.items():
            resource.add_route(method, handler)
