-- Console sessions (SPEC §9) kept in the database: every process behind a load balancer knows
-- a session made by another, and signing out on one ends it on all.

CREATE TABLE console_sessions (
    hash          text PRIMARY KEY,          -- sha256 hex of the cookie's random id; the id is never stored
    organization  text,                      -- NULL: an ADMIN (every organization)
    home          text NOT NULL,             -- the organization the rate limit counts against
    label         text NOT NULL,
    token_id      text,                      -- the API token it came from (NULL: a console-link)
    csrf          text NOT NULL,
    flash         text NOT NULL DEFAULT '[]', -- JSON list of messages for the next page
    created_ms    bigint NOT NULL,
    last_seen_ms  bigint NOT NULL,
    expires_ms    bigint NOT NULL            -- last_seen_ms + the idle expiry
);

-- The retention purge deletes expired sessions: a range of this index.
CREATE INDEX console_sessions_expiry ON console_sessions (expires_ms);
-- A token's sessions, newest first: sign-in keeps at most SESSIONS_PER_TOKEN of them.
CREATE INDEX console_sessions_token ON console_sessions (token_id, last_seen_ms) WHERE token_id IS NOT NULL;
-- The purge's range over expired sign-in links.
CREATE INDEX console_links_expiry ON console_links (expires_ms);
