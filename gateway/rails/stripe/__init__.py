"""Stripe: MPP's ``stripe`` charge with Shared Payment Tokens (``charge.py``), through the
``stripe`` SDK (``client.py``, which translates its exceptions at the boundary)."""
