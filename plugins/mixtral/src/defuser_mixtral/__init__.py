"""defuser plugin: the mixtral model family."""
