"""Typed errors. Every message names the file/endpoint, symbol, row or field and what was expected."""


class DataError(ValueError):
    """Input data breaks the data contract (NaN, non-positive price, duplicate key, bad order...)."""


class ConfigError(ValueError):
    """A setting or strategy definition is invalid or can never be satisfied."""


class SolverError(RuntimeError):
    """A solve failed or returned a solution that does not satisfy its constraints."""


class SourceUnavailable(RuntimeError):
    """A market-data source kept failing (network, rate limit, server error) after its retries."""
