"""clara_results."""
