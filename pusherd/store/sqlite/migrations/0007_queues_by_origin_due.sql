-- A claim reads the due queues of each origin with room, up to that room, from this index: the
-- rows it reads follow the rows it takes. The due index alone made a claim for one origin with
-- room skip every due queue of the blocked origins (10,000 queues over 50 origins: some 130,000
-- SQLite instructions to take one row). The distinct origins with pending work are found by
-- skipping through it, one seek per origin.
CREATE INDEX queues_origin_due ON queues(origin, next_due_ms) WHERE next_due_ms IS NOT NULL;
