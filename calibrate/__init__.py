"""Stage 1: uncached sampling that records the statistics the planner needs."""
