"""cellray engine."""
