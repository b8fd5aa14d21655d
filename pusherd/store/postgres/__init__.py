"""The PostgreSQL backend (SPEC §8): schema and migrations so far; the Store comes next.

Nothing outside `store/` imports this package; `open_store` will pick it for a `storage.url`.
"""
