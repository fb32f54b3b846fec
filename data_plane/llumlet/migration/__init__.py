"""Live migration: the pure stage planner and the source/destination coordinators around it."""
