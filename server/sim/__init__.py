"""`fastmatch sim`: simulated players over real WebSockets, invariant checks, reports."""
