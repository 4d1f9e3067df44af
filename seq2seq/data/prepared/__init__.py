"""The prepared data cache (:mod:`.cache`). This file imports nothing, so that importing a module of
the package loads only what that module needs."""
