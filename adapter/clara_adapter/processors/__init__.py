"""Job processors: the plug-in API and the AE Title Job Processor built on it."""
