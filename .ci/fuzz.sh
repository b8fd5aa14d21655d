#!/usr/bin/env bash
# Fuzz every operation of the served OpenAPI document (every path form of it too) against a live
# `pusherd serve` with schemathesis.
# Fails on any 5xx, any status/content type/body that the document does not describe, or a daemon
# that stops answering /healthz. Usage: .ci/fuzz.sh [MAX_EXAMPLES]  (needs pusherd, schemathesis and
# curl on PATH; FUZZ_SEED picks another seed). schemathesis runs in a temp dir: no cache in the repo.
set -euo pipefail
cd "$(dirname "$0")/.."

max_examples="${1:-${FUZZ_MAX_EXAMPLES:-30}}"
work="$(mktemp -d)"
pid=""
cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}
api_port="$(free_port)"
ingest_port="$(free_port)"
while [ "$ingest_port" = "$api_port" ]; do ingest_port="$(free_port)"; done

# allow_http/allow_private_destinations: generated destinations are accepted without DNS; the
# dispatcher's attempts to them fail fast and stay in the background.
cat >"$work/pusherd.toml" <<TOML
[api]
listen = "127.0.0.1:$api_port"
[ingest]
listen = "127.0.0.1:$ingest_port"
[storage]
path = "$work/pusherd.sqlite3"
[delivery]
allow_http = true
allow_private_destinations = true
timeout = "2s"
shutdown_grace = "1s"
[ratelimit]
per_minute = 1000000
per_hour = 10000000
[log]
level = "warning"
TOML

org="$(python3 -c 'import uuid; print(uuid.uuid4())')"
token="$(pusherd token create --config "$work/pusherd.toml" --org "$org" \
    --scope READ:PURCHASE --scope READ:FINANCE --scope READ:USERINFO --scope READ:PRODUCT --name fuzz)"

# The daemon runs under the tests' loopback guard (tests/loopback.py, installed by the sitecustomize
# of tests/loopback_site): schemathesis also makes up destinations, which this daemon accepts and
# delivers to. The guard refuses those attempts as refused connections (and names as unknown) and
# lists them in $work/refused.log: nothing leaves loopback.
PYTHONPATH="$PWD/tests/loopback_site${PYTHONPATH:+:$PYTHONPATH}" PUSHERD_TEST_OUTBOUND="$work/refused.log" \
    pusherd serve --config "$work/pusherd.toml" >"$work/pusherd.log" 2>&1 &
pid=$!

healthy() {
    curl -fsS --max-time 5 "http://127.0.0.1:$api_port/healthz" >/dev/null 2>&1 &&
        curl -fsS --max-time 5 "http://127.0.0.1:$ingest_port/healthz" >/dev/null 2>&1
}
for _ in $(seq 1 100); do healthy && break; sleep 0.1; done
healthy || { echo "fuzz: pusherd did not start" >&2; cat "$work/pusherd.log" >&2; exit 1; }

# A few real rows, so that id-taking operations also meet existing webhooks and events.
for _ in 1 2; do
    pusherd emit --config "$work/pusherd.toml" ProductCreated --org "$org" --data '{"n": 1}' >/dev/null
done
curl -fsS -o /dev/null -X POST "http://127.0.0.1:$api_port/api/webhooks/register" \
    -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    -d '{"url": "http://127.0.0.1:9/hook", "eventTypes": ["ProductCreated"]}'

# Steer part of the generated data towards values that get past validation (the rest stays random),
# so that the code behind validation is fuzzed too.
cat >"$work/schemathesis.toml" <<TOML
[parameters]
"path.organizationUuid" = { dictionary = "orgs", probability = 0.8 }
"body.organizationUuid" = { dictionary = "org_uuids", probability = 0.7 }
"body.eventName" = { dictionary = "events", probability = 0.7 }
"body.eventNames[*]" = { dictionary = "events", probability = 0.7 }
"body.eventTypes[*]" = { dictionary = "events", probability = 0.7 }
"body.destination" = { dictionary = "urls", probability = 0.7 }
"body.url" = { dictionary = "urls", probability = 0.7 }
"body.contactEmail" = { dictionary = "emails", probability = 0.7 }

[dictionaries.orgs]
values = ["self", "$org"]
[dictionaries.org_uuids]
values = ["$org"]
[dictionaries.events]
values = ["ProductCreated", "ProductUpdated", "PurchaseCreated", "PaymentCreated", "ApplicationConnectionRemoved"]
[dictionaries.urls]
values = ["http://127.0.0.1:9/hook", "https://127.0.0.1:9/a?b=c", "http://[::1]:9/x"]
[dictionaries.emails]
values = ["ops@example.com", "a.b+c@mail.example.org"]
TOML

checks="not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance"
common=(
    --checks "$checks"
    --max-examples "$max_examples"
    --seed "${FUZZ_SEED:-20261122}"
    --request-timeout 10
    --suppress-health-check all
)
status=0

echo "fuzz: API listener (Zettle + PayStell + service routes), $max_examples examples per operation"
(cd "$work" && schemathesis --no-color --config-file "$work/schemathesis.toml" run "http://127.0.0.1:$api_port/openapi.json" \
    --url "http://127.0.0.1:$api_port" \
    --header "Authorization: Bearer $token" \
    --exclude-path /events --exclude-path /events/ --exclude-path /metrics --exclude-path /metrics/ \
    "${common[@]}") || status=1

echo "fuzz: ingest listener"
(cd "$work" && schemathesis --no-color --config-file "$work/schemathesis.toml" run "http://127.0.0.1:$api_port/openapi.json" \
    --url "http://127.0.0.1:$ingest_port" \
    --include-path /events --include-path /metrics --include-path /healthz \
    --include-path /events/ --include-path /metrics/ --include-path /healthz/ \
    "${common[@]}") || status=1

if ! healthy; then
    echo "fuzz: pusherd stopped answering /healthz" >&2
    status=1
fi
if ! kill -0 "$pid" 2>/dev/null; then
    echo "fuzz: pusherd exited" >&2
    status=1
fi
if grep -q '"request_crashed"' "$work/pusherd.log"; then
    echo "fuzz: pusherd logged crashed requests:" >&2
    grep '"request_crashed"' "$work/pusherd.log" | head -20 >&2
    status=1
fi
if [ -s "$work/refused.log" ]; then
    echo "fuzz: the loopback guard refused $(wc -l <"$work/refused.log") attempts to leave loopback, e.g.:"
    sort -u "$work/refused.log" | head -5
fi
if [ "$status" -ne 0 ]; then
    echo "fuzz: FAILED (daemon log tail follows)" >&2
    tail -50 "$work/pusherd.log" >&2
    exit 1
fi
echo "fuzz: OK"
