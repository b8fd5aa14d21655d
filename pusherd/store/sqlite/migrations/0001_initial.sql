-- pusherd schema, version 1. Times are unix milliseconds (INTEGER).

CREATE TABLE tokens (
    id            TEXT PRIMARY KEY,          -- public id shown by `token list`, taken by `revoke`
    hash          TEXT NOT NULL UNIQUE,      -- sha256 hex of the secret; the secret is never stored
    organization  TEXT NOT NULL,
    scopes        TEXT NOT NULL,             -- JSON array
    name          TEXT NOT NULL DEFAULT '',
    created_ms    INTEGER NOT NULL,
    expires_ms    INTEGER,                   -- NULL: never
    revoked_ms    INTEGER                    -- NULL: valid
);

CREATE TABLE subscriptions (
    uuid              TEXT PRIMARY KEY,
    organization      TEXT NOT NULL,
    transport         TEXT NOT NULL,
    event_names       TEXT NOT NULL,         -- JSON array; [] = every event `scopes` allow
    scopes            TEXT NOT NULL,         -- JSON array: scopes of the token that created / last updated it
    destination       TEXT NOT NULL,
    contact_email     TEXT,
    status            TEXT NOT NULL,         -- ACTIVE | FAILING | DISABLED
    signing_key       TEXT NOT NULL,
    prev_signing_key  TEXT,                  -- rotated-out key, still signing until prev_key_until_ms
    prev_key_until_ms INTEGER,
    created_ms        INTEGER NOT NULL,
    updated_ms        INTEGER NOT NULL,
    failing_since_ms  INTEGER,               -- start of the current run of failed attempts
    deleted_ms        INTEGER                -- soft delete keeps the uuid taken and the delivery log whole
);
CREATE INDEX subscriptions_by_org ON subscriptions(organization, created_ms);

CREATE TABLE events (
    seq           INTEGER PRIMARY KEY,       -- ingest order
    uuid          TEXT NOT NULL,             -- messageUuid
    organization  TEXT NOT NULL,
    event_name    TEXT NOT NULL,
    message_id    TEXT NOT NULL,
    payload       TEXT NOT NULL,             -- the payload, JSON-encoded: sent as the envelope's string
    timestamp     TEXT NOT NULL,             -- envelope timestamp
    created_ms    INTEGER NOT NULL
);
CREATE UNIQUE INDEX events_message_id ON events(organization, message_id);

CREATE TABLE deliveries (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, it is a public id
    event_seq        INTEGER NOT NULL,
    subscription     TEXT NOT NULL,
    status           TEXT NOT NULL,          -- pending | delivered | failed | cancelled
    attempts         INTEGER NOT NULL DEFAULT 0,  -- every attempt ever made
    schedule_pos     INTEGER NOT NULL DEFAULT 0,  -- failed attempts since last (re)queued: retry_schedule index
    due_ms           INTEGER NOT NULL,       -- pending: earliest time a claim may take it
    lease_owner      TEXT,
    lease_until_ms   INTEGER,
    created_ms       INTEGER NOT NULL,
    finished_ms      INTEGER,
    last_attempt_ms  INTEGER,
    last_status_code INTEGER,
    last_error       TEXT
);
-- Claiming is a range scan of this index, whatever the size of the queue.
CREATE INDEX deliveries_due ON deliveries(due_ms, id) WHERE status = 'pending';
CREATE INDEX deliveries_by_subscription ON deliveries(subscription, id);
CREATE INDEX deliveries_by_event ON deliveries(event_seq);

CREATE TABLE attempts (
    id             INTEGER PRIMARY KEY,
    delivery_id    INTEGER NOT NULL,
    started_ms     INTEGER NOT NULL,
    duration_ms    REAL NOT NULL,
    status_code    INTEGER,
    error          TEXT,
    response_body  TEXT
);
CREATE INDEX attempts_by_delivery ON attempts(delivery_id);
