"""HTTP routes: the two subscription dialects and ingest."""
