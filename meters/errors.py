"""Errors raised by the metering layer.

Hierarchy::

    MeterError                    base; every error has a machine-readable ``code`` and a ``status``
    ├── ConfigError               bad rate or tokenizer configuration (refuse to start)
    ├── InvalidAmount             an amount that is not a non-negative integer / decimal string
    ├── AccountNotFound           no account with that id
    ├── InsufficientFunds         the balance cannot pay for what was asked
    ├── DuplicateCredit           an idempotency key was already used for another amount
    └── LedgerUnavailable         Redis is unreachable or failed: fail closed

``status`` is the HTTP status the gateway maps the error to; it is a plain integer so that this
package stays free of any HTTP dependency.
"""

from __future__ import annotations


class MeterError(Exception):
    """Base class for metering errors."""

    code = "meter_error"
    status = 500

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ConfigError(MeterError):
    code = "invalid_config"
    status = 500


class InvalidAmount(MeterError):
    code = "invalid_amount"
    status = 400


class AccountNotFound(MeterError):
    code = "account_not_found"
    status = 404


class InsufficientFunds(MeterError):
    """The balance cannot cover the request; ``needed`` and ``available`` are atomic units."""

    code = "insufficient_funds"
    status = 402

    def __init__(self, message: str, *, needed: int, available: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available


class DuplicateCredit(MeterError):
    code = "duplicate_credit"
    status = 409


class LedgerUnavailable(MeterError):
    code = "ledger_unavailable"
    status = 503
