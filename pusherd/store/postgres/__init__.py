"""The PostgreSQL backend (SPEC §8), built up to the Store interface of issue 11.

So far: the schema and its migrations (migrate.py, migrations/*.sql, with the claim and rate
limit functions), the pool and what a lost database looks like (pool.py), the LISTEN connection
(listener.py), group-committed ingest (ingest.py), claiming and fenced finishing (claims.py),
rate limits across processes (ratelimit.py) and copy-storage (copy.py). The Store class that
puts them behind the interface, and `open_store` choosing it for a `storage.url`, come next.
Nothing outside `store/` imports this package.
"""
