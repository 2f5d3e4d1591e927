"""The planner: pure functions from (desired, observed, last-applied) to a Plan. No I/O, deterministic."""
