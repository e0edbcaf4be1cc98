"""defuser plugin: Databricks DBRX."""
