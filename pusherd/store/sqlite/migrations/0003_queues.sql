-- Claim queues, not jobs: one row per deliverable subscription (live, not DISABLED) carrying
-- the earliest time any of its pending deliveries may be claimed: min(due_ms) of its pending
-- rows (a leased row's due_ms is its lease's end, so an expired lease is found too); NULL when
-- nothing is pending. The dispatcher reads the due end of this index, so its cost follows the
-- work that is due, not the number of subscriptions. `origin` (scheme://host:port of the
-- destination) lets a claim skip destinations that have no room or are paused.
CREATE TABLE queues (
    subscription  TEXT PRIMARY KEY,
    origin        TEXT NOT NULL,
    next_due_ms   INTEGER
);
CREATE INDEX queues_due ON queues(next_due_ms) WHERE next_due_ms IS NOT NULL;
-- Which origins any deliverable subscription still points at (the dispatcher forgets the rest).
CREATE INDEX queues_by_origin ON queues(origin);

-- pusherd_origin() is registered by the migrating connection (the same rule as the dispatcher's).
INSERT INTO queues (subscription, origin, next_due_ms)
SELECT s.uuid, pusherd_origin(s.destination),
       (SELECT min(d.due_ms) FROM deliveries d WHERE d.subscription = s.uuid AND d.status = 'pending')
FROM subscriptions s WHERE s.deleted_ms IS NULL AND s.status != 'DISABLED';
