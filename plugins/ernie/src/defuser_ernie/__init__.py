"""defuser plugin: Baidu ERNIE 4.5 MoE."""
