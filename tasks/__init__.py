"""ul2x.tasks."""
