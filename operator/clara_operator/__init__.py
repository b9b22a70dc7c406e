"""clara_operator."""
