"""cellray jobs."""
