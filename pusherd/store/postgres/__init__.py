"""The PostgreSQL backend (SPEC §8): `PostgresStore` (store.py), chosen by `open_store` when
`storage.url` is a postgresql:// URL.

The schema and its migrations (migrate.py, migrations/*.sql, with the claim and rate limit
functions), the pool and what a lost database looks like (pool.py), the LISTEN connection
(listener.py) and the change feed over NOTIFY (feed.py), group-committed ingest (ingest.py),
claiming and fenced finishing (claims.py), tokens and subscriptions (directory.py), the delivery
queue (queue.py), the delivery log (log.py), rate limits across processes (ratelimit.py) and
copy-storage (copy.py). Nothing outside `store/` imports this package but the CLI's
copy-storage.
"""
