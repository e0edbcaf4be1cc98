"""defuser plugin: Meituan LongCat-Flash."""
