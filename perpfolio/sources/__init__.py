"""Market data sources: each returns polars frames in the raw-layer schemas."""
