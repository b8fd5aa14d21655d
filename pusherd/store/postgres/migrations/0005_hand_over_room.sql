-- The room the ingest hand-over may use on an origin (issue 12), taken under the origin's lock.
-- It takes the origin's advisory lock (as pusherd_claim does) and only then counts the live
-- leases, in a query of its own: a VOLATILE function's queries see what committed before each
-- of them. Counted in the ingest statement's own snapshot, which is taken before the statement
-- waits for its queue rows, a claim that committed meanwhile went unseen and the hand-over
-- could exceed per_destination. 0 when another transaction holds the lock.
CREATE FUNCTION pusherd_hand_over_room(
    p_origin text, p_owner text, p_now bigint, p_room integer, p_per_destination integer
) RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_live bigint;
    v_others bigint;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtextextended('pusherd.origin:' || p_origin, 0)) THEN
        RETURN 0;
    END IF;
    SELECT count(*), count(*) FILTER (WHERE d.lease_owner <> p_owner)
    INTO v_live, v_others FROM deliveries d
    WHERE d.origin = p_origin AND d.status = 'pending' AND d.lease_owner IS NOT NULL
        AND d.lease_until_ms > p_now;
    -- Alone on the origin, the caller's own limit (the room it offers) is the only one.
    IF v_others = 0 THEN
        RETURN p_room;
    END IF;
    RETURN greatest(0, least(p_room, p_per_destination - v_live));
END
$$;
