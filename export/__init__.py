"""ul2x.export."""
