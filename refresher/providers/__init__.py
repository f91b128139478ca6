"""Token providers: one module per partner API, sharing `providers.base`."""
