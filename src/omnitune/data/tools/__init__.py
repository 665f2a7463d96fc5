"""Dataset converters (`omnitune data ...`)."""
