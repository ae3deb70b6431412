"""Stage one: run the backbone once and write the cache (never imports adl.train)."""
