-- The console (SPEC §9): one-time sign-in links, and what its pages ask for at any size.

CREATE TABLE console_links (
    hash          text PRIMARY KEY,          -- sha256 hex of the link's secret; the secret is never stored
    organization  text NOT NULL,
    created_ms    bigint NOT NULL,
    expires_ms    bigint NOT NULL,
    used_ms       bigint                     -- NULL: not used yet; a link signs in once
);

-- Deliveries finished in a time window (per-minute charts, 24h counts per subscription): a range
-- of this covering index (an index-only scan). Partial, so ingest (which inserts unfinished
-- rows) never touches it.
CREATE INDEX deliveries_finished ON deliveries (finished_ms, subscription, status)
    WHERE finished_ms IS NOT NULL;
