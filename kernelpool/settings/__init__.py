"""The settings by area, as mixins of `kernelpool.config.Settings` (import that, not these)."""
