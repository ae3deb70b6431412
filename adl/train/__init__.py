"""Stage two: heads trained from the cache only (never imports adl.extract)."""
