"""HTTP side of tollstream: routes, dialects, upstream proxying, payment wire formats."""
