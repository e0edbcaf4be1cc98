"""Example third-party defuser plugin for the made-up ``toy_moe`` family.

``defuser_example.hooks`` is the plugin (cheap to import: no model code); importing
``defuser_example.modeling`` defines the model and registers it with transformers.
"""
