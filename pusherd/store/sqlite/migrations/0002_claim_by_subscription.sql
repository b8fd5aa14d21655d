-- Claim per subscription: the dispatcher asks each subscription whose destination has room for its
-- due rows, in due order. A paused or busy destination's rows are then never read at all, and
-- "pending rows of one subscription" (delete, disable) is a range of this index too.
DROP INDEX deliveries_due;
CREATE INDEX deliveries_due ON deliveries(subscription, due_ms, id) WHERE status = 'pending';
