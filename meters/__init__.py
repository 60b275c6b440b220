"""Money and tokens: rates, token counting, the Redis ledger and the metering policy.

Nothing in this package knows about HTTP; :mod:`gateway` depends on it, never the reverse.
"""
