"""Logs an operator can search: one line per metered request (``tollstream.request``: request
id, model, account, outcome, tokens, charge, duration), as plain text for people at a terminal
or as JSON lines (``log_format = "json"``) for a log pipeline. The request id is the one every
response carries in ``X-Request-Id``. Never logged: API keys, tokens, credentials, secrets
(nothing here receives them)."""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any

import orjson

from meters.meter import Bill

REQUESTS = logging.getLogger("tollstream.request")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and a record's ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def configure(fmt: str, level: str = "info") -> None:
    """Route every logger (uvicorn's included) through one handler in ``fmt``."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def request_done(*, request_id: str, model: str, account_id: str, bill: Bill,
                 started: float) -> None:
    """The one line of a metered request, once its final charge is made."""
    if not REQUESTS.isEnabledFor(logging.INFO):
        return  # (a logging level above info: nothing to build)
    fields = {"request_id": request_id, "model": model, "account": account_id,
              "outcome": bill.outcome.value, "input_tokens": bill.input_tokens,
              "output_tokens": bill.output_tokens, "delivered_tokens": bill.delivered_tokens,
              "charged": str(bill.charged), "shortfall": str(bill.shortfall),
              "duration_ms": round((time.monotonic() - started) * 1000, 1)}
    REQUESTS.info("request %s %s %s account=%s in=%d out=%d charged=%s %.1fms", request_id,
                  model, bill.outcome.value, account_id, bill.input_tokens,
                  bill.output_tokens, bill.charged, fields["duration_ms"],
                  extra={"fields": fields})
