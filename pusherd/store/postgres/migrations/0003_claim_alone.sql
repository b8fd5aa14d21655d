-- Issue 12: a process alone on an origin may keep claimed rows ready behind its attempts in
-- flight (p_alone_total); otherwise as before. The argument list changes, so the function is
-- replaced, not redefined (a second one would make every call ambiguous).

DROP FUNCTION pusherd_claim(text, text[], integer[], integer, integer, integer, bigint, bigint, integer);

CREATE FUNCTION pusherd_claim(
    p_owner text,
    p_room_origins text[],      -- origins the caller has a room for ...
    p_room_counts integer[],    -- ... and how many more attempts it may start to each
    p_default_room integer,     -- its room for any other origin
    p_budget integer,           -- at most this many in all (the process's free slots)
    p_per_destination integer,  -- live leases per origin, all processes together
    p_now bigint,               -- NULL: the database's clock (see below)
    p_lease_ms bigint,
    p_default_total integer DEFAULT NULL,  -- at most this many for the origins not named, together
    p_alone_total integer DEFAULT NULL     -- live leases a sole holder may have (see below)
) RETURNS TABLE (
    id bigint, lease_token bigint, subscription text, attempts integer, schedule_pos integer,
    organization text, message_uuid text, event_name text, message_id text, payload text,
    "timestamp" text, destination text, signing_key text, prev_signing_key text,
    prev_key_until_ms bigint, more boolean, next_due_ms bigint
) LANGUAGE plpgsql AS $$
DECLARE
    v_scan integer := greatest(p_budget, 0) + 16;  -- due queues read per claim
    v_origin text;
    v_sub text;
    v_live integer;
    v_others integer;
    v_allow integer;
    v_origins text[] := '{}';
    v_allows integer[] := '{}';
    v_shares integer[] := '{}';
    v_due integer;
    v_named boolean;
    v_unnamed integer := p_default_total;  -- NULL: no total for the origins not named
    v_i integer;
    v_queues integer;
    v_share integer;
    v_left integer;
    v_more boolean := false;
    v_ids bigint[] := '{}';
    v_got bigint[];
BEGIN
    -- A lease that is lost in a crash only makes its row due again: no fsync to wait for.
    PERFORM set_config('synchronous_commit', 'off', true);
    -- Processes on several machines judge each other's leases by one clock, the database's:
    -- a machine whose clock runs ahead would otherwise take rows over before their lease ends.
    p_now := coalesce(p_now, (extract(epoch FROM clock_timestamp()) * 1000)::bigint);
    IF p_budget <= 0 THEN
        v_scan := 0;
    END IF;
    FOR v_origin, v_due IN
        SELECT due.origin, count(*) FROM (
            SELECT q.origin FROM queues q WHERE q.next_due_ms <= p_now
            ORDER BY q.next_due_ms LIMIT v_scan
        ) due GROUP BY due.origin ORDER BY due.origin  -- one order for every process's locks
    LOOP
        v_named := array_position(p_room_origins, v_origin) IS NOT NULL;
        v_allow := coalesce(
            p_room_counts[array_position(p_room_origins, v_origin)], p_default_room);
        IF NOT v_named AND v_unnamed IS NOT NULL THEN
            -- Shared in origin order (the lock order), not due order as on SQLite.
            v_allow := least(v_allow, v_unnamed);
        END IF;
        v_allow := least(v_allow, p_budget);
        CONTINUE WHEN v_allow <= 0;
        IF NOT pg_try_advisory_xact_lock(hashtextextended('pusherd.origin:' || v_origin, 0)) THEN
            v_more := true;
            CONTINUE;
        END IF;
        SELECT count(*), count(*) FILTER (WHERE d.lease_owner <> p_owner)
        INTO v_live, v_others FROM deliveries d
        WHERE d.origin = v_origin AND d.status = 'pending' AND d.lease_owner IS NOT NULL
            AND d.lease_until_ms > p_now;
        -- A live lease may be an attempt in flight, a row ready behind them or one being
        -- recorded; the database cannot tell which. While no other process holds any, the
        -- caller's own limit on attempts in flight (per_destination) is the only one that
        -- counts, and it may keep rows ready up to p_alone_total: else every row would wait
        -- for a claim after the previous one's record committed (issue 12: one destination
        -- drained at 1,064/s). Once another process holds one, all leases together stay
        -- within per_destination, so the attempts of all of them do; and while one holds more,
        -- the others take none for the origin.
        IF v_others = 0 AND p_alone_total IS NOT NULL THEN
            v_allow := least(v_allow, greatest(p_alone_total, p_per_destination) - v_live);
        ELSE
            v_allow := least(v_allow, p_per_destination - v_live);
        END IF;
        IF v_allow > 0 THEN
            v_origins := v_origins || v_origin;
            v_allows := v_allows || v_allow;
            -- The origin's room is shared among its due queues, as on SQLite.
            v_shares := v_shares || ceil(v_allow::numeric / v_due)::integer;
            IF NOT v_named AND v_unnamed IS NOT NULL THEN
                v_unnamed := v_unnamed - v_allow;
            END IF;
        END IF;
    END LOOP;
    SELECT count(*) INTO v_queues FROM (
        SELECT 1 FROM queues q WHERE q.next_due_ms <= p_now AND q.origin = ANY(v_origins)
        LIMIT v_scan
    ) due;
    v_share := greatest(1, ceil(p_budget::numeric / greatest(v_queues, 1)));
    FOR v_sub, v_origin IN
        SELECT q.subscription, q.origin FROM queues q
        WHERE q.next_due_ms <= p_now AND q.origin = ANY(v_origins)
        ORDER BY q.next_due_ms LIMIT v_scan
        FOR UPDATE SKIP LOCKED
    LOOP
        v_i := array_position(v_origins, v_origin);
        v_left := least(v_allows[v_i], p_budget, v_share, v_shares[v_i]);
        IF v_left <= 0 THEN
            v_more := true;
            CONTINUE;
        END IF;
        WITH taken AS (
            UPDATE deliveries d
            SET lease_owner = p_owner, lease_token = nextval('lease_tokens'),
                lease_until_ms = p_now + p_lease_ms, due_ms = p_now + p_lease_ms
            WHERE d.id IN (
                SELECT d2.id FROM deliveries d2
                WHERE d2.subscription = v_sub AND d2.status = 'pending' AND d2.due_ms <= p_now
                ORDER BY d2.due_ms, d2.id LIMIT v_left
                FOR UPDATE SKIP LOCKED
            )
            RETURNING d.id
        )
        SELECT array_agg(taken.id) INTO v_got FROM taken;
        IF coalesce(cardinality(v_got), 0) >= v_left THEN
            v_more := true;  -- it may have more due
        END IF;
        IF v_got IS NOT NULL THEN
            v_ids := v_ids || v_got;
            v_allows[v_i] := v_allows[v_i] - cardinality(v_got);
            p_budget := p_budget - cardinality(v_got);
        END IF;
        UPDATE queues q SET next_due_ms = (
            SELECT min(d.due_ms) FROM deliveries d
            WHERE d.subscription = v_sub AND d.status = 'pending'
        ) WHERE q.subscription = v_sub;
    END LOOP;
    IF v_queues >= v_scan AND v_scan > 0 THEN
        v_more := true;  -- more due queues than were read
    END IF;
    RETURN QUERY
        SELECT d.id, d.lease_token, d.subscription, d.attempts, d.schedule_pos, e.organization,
            e.uuid, e.event_name, e.message_id, e.payload, e.timestamp, s.destination,
            s.signing_key, s.prev_signing_key, s.prev_key_until_ms, NULL::boolean, NULL::bigint
        FROM deliveries d JOIN events e ON e.seq = d.event_seq
        JOIN subscriptions s ON s.uuid = d.subscription
        WHERE d.id = ANY(v_ids) ORDER BY d.id;
    RETURN QUERY
        SELECT NULL::bigint, NULL::bigint, NULL, NULL::integer, NULL::integer, NULL, NULL, NULL,
            NULL, NULL, NULL, NULL, NULL, NULL, NULL::bigint, v_more,
            (SELECT min(q.next_due_ms) FROM queues q WHERE q.next_due_ms > p_now);
END
$$;
