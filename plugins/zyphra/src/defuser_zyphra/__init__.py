"""defuser plugin: Zyphra Zamba2, ZAYA."""
