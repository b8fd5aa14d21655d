-- The minutely retention purge looks for events older than the cutoff that no delivery needs:
-- a range of this index instead of a scan of every event (an idle daemon with 100,000 events
-- read them all every minute). created_ms grows with ingest, so new entries go at its end.
CREATE INDEX events_by_age ON events(created_ms);
