"""clara_adapter."""
