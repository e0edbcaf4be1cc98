"""defuser plugin: the glm model family."""
