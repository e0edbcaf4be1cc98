"""defuser plugin: Microsoft Phi."""
